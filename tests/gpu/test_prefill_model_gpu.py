"""On a GPU: the batched prefill steps inside a built model (one CUDA graph each) against feeding
the prompt through the decode step, and the time each takes for a long prompt."""
import numpy as np
import pytest

import shardtune
from shardtune.tuner.targets import local_gpu_arch

PROMPT = [1, 7, 42, 99, 3]                             # padded to the bucket 8
LONG = [(i * 37 + 5) % 500 for i in range(300)]        # 2 chunks of 128, then 44 padded to 64
FOLLOW = [11, 2, 60]


@pytest.fixture(scope="module", params=["q4f16_1", "q0f16"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("prefill") / request.param
    shardtune.build(str(path), model="tiny", random_weights=True, quant=request.param, arch=local_gpu_arch(),
                    capacity=512, prefill=(8, 64, 128))
    return shardtune.load(str(path), seed=5)


def test_prefill_then_decode_matches_token_by_token(model):
    for prompt in (PROMPT, LONG):
        ref = [[model.step(t, i) for i, t in enumerate(prompt)][-1]]
        ref += [model.step(t, len(prompt) + i) for i, t in enumerate(FOLLOW)]
        got = [model.prefill(prompt)] + [model.step(t, len(prompt) + i) for i, t in enumerate(FOLLOW)]
        scale = np.abs(ref[0]).max()
        for i, (a, b) in enumerate(zip(got, ref)):
            assert np.abs(a - b).max() < 1e-2 * scale, (len(prompt), i, np.abs(a - b).max() / scale)


def test_prefill_is_faster_than_token_by_token(model):
    import time

    model.prefill(LONG)          # first calls: graph capture
    t0 = time.perf_counter()
    model.prefill(LONG)
    t1 = time.perf_counter()
    for i, t in enumerate(LONG):
        model.step(t, i)
    t2 = time.perf_counter()
    print(f"{model.conf['quant']}: {len(LONG)} tokens batched {1e3 * (t1 - t0):.1f} ms, "
          f"token by token {1e3 * (t2 - t1):.1f} ms")
    assert t1 - t0 < t2 - t1
