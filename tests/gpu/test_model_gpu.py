"""On a GPU: the built model (random weights, made by the same hash on either device)
gives the same greedy ids and close logits as the CPU build of the same model, with
and without kernels from a tuning database, and under CUDA graphs."""
import numpy as np
import pytest

import shardtune
from shardtune.database import TuningDB
from shardtune.tuner.targets import local_gpu_arch

PROMPT = [1, 7, 42, 99, 3]


def _run(path, n=16):
    return shardtune.load(str(path), seed=5).generate(PROMPT, max_new_tokens=n, return_logits=True,
                                                       stop_at_eos=False)


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("cpu") / "tiny"
    shardtune.build(str(path), model="tiny", random_weights=True, quant="q4f16_1", arch="cpu", capacity=128)
    return _run(path)


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "tiny.db"
    shardtune.tune(arch=local_gpu_arch(), shards=1, model="tiny", db=str(db), trials_per_kernel=3,
                   kernels=["gemv", "norm", "attention"], progress=False)
    return db


@pytest.mark.parametrize("with_db", [False, True])
def test_gpu_model_matches_cpu_build(cpu_reference, tuned_db, with_db, tmp_path):
    path, empty = tmp_path / "tiny-gpu", tmp_path / "empty.db"
    TuningDB(str(empty)).close()
    conf = shardtune.build(str(path), model="tiny", random_weights=True, quant="q4f16_1", arch=local_gpu_arch(),
                           capacity=128, db=str(tuned_db if with_db else empty))
    sources = {k["source"] for k in conf["kernels"]}
    assert ("database" in sources) == with_db
    ids, logits = _run(path)
    ref_ids, ref_logits = cpu_reference
    scale = np.abs(ref_logits).max()
    assert np.abs(logits - ref_logits).max() < 2e-2 * scale
    for i, (a, b) in enumerate(zip(ids, ref_ids)):
        top2 = np.sort(ref_logits[i])[-2:]
        if top2[1] - top2[0] < 2e-2 * scale:
            break
        assert a == b, (i, ids, ref_ids)
    # the argmax taken inside the decode step's CUDA graph: the host's ids, token for token
    assert shardtune.load(str(path), seed=5).generate(PROMPT, max_new_tokens=16, stop_at_eos=False) == ids


def test_bench_on_gpu(tmp_path):
    path = tmp_path / "bench"
    shardtune.build(str(path), model="tiny", random_weights=True, quant="q4f16_1", arch=local_gpu_arch(), capacity=512)
    model = shardtune.load(str(path))
    res = model.bench(prompt_len=8, gen_len=64, repeat=2)
    assert res["decode_tok_s"] > 0 and 0 < res["roofline_fraction"] < 1.2
    assert res["use_cuda_graph"] and res["greedy"].startswith("argmax on the device")
    host = model.bench(prompt_len=8, gen_len=64, repeat=2, host_argmax=True)
    assert host["greedy"].startswith("logits copied")
