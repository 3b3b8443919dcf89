"""On a GPU: the prefill templates (embedding, prefill_rope_kv_append, prefill_attention, the
q4f16_1_gemm of the linear layers) with their default knobs and two sampled valid ones match the NumPy reference at Llama shapes. Skipped
without a GPU (tests/gpu/conftest.py). Latencies are printed (pytest -s), not asserted."""
import itertools

import numpy as np
import pytest
import tvm

from shardtune.kernels import get_template
from shardtune.tuner.measure import run_poisoned
from shardtune.tuner.targets import get_arch, local_gpu_arch

# Llama-2-7B (32/32 heads), Llama-2-70B on 2 GPUs (32/4) and on 4 (16/2); head_dim 128.
LLAMA_HEADS = [(32, 32), (32, 4), (16, 2)]


def heads(hq, hkv, n, **extra):
    return {"n": n, "q_heads": hq, "kv_heads": hkv, "head_dim": 128, "capacity": 4096, "dtype": "float16", **extra}


def _shapes(name):
    """(workload, variants): a variant changes only the inputs (pos0), not the built kernel."""
    if name == "embedding":
        return [({"n": n, "vocab": V, "H": H, "quant": quant}, [{}])
                for n, (V, H), quant in itertools.product((1, 512), ((32000, 4096), (8000, 8192)),
                                                         ("q0f16", "q4f16_1"))]
    if name == "q4f16_1_gemm":   # Llama-2-7B's QKV and down at the default buckets, and 8 tokens (padded)
        return [({"M": m, "N": n, "K": k}, [{}]) for m in (8, 16, 64, 256) for n, k in ((12288, 4096), (4096, 11008))]
    if name == "prefill_rope_kv_append":   # the prompt ends at the last cache row, or starts at 0
        return [(heads(hq, hkv, n, theta=10000.0), [{}, {"pos0": 0}])
                for (hq, hkv), n in itertools.product(LLAMA_HEADS, (8, 256))]
    return [(heads(hq, hkv, n), [{"pos0": 0}, {"pos0": 1000}])
            for (hq, hkv), n in itertools.product(LLAMA_HEADS, (8, 32, 128, 256))]


@pytest.mark.parametrize("name", ["embedding", "prefill_rope_kv_append", "prefill_attention", "q4f16_1_gemm"])
def test_candidates_match_reference_on_gpu(name):
    target = tvm.target.Target(get_arch(local_gpu_arch()).target)
    dev = tvm.cuda(0) if target.kind.name == "cuda" else tvm.rocm(0)
    tpl = get_template(name)
    rng = np.random.default_rng(0)
    for shape, variants in _shapes(name):
        built = []
        for knobs in tpl.sample_knobs(shape, target, rng, 3, first=[tpl.default_knobs(shape, target)]):
            with target:
                built.append((knobs, tvm.compile(tpl.schedule(shape, knobs, target), target=target).mod))
        for wl in ({**shape, **v} for v in variants):
            inputs = tpl.inputs(wl, rng)
            if name == "prefill_attention":    # rows past the prompt: neither read nor weighted
                for cache in inputs[1:3]:
                    cache[:, wl["pos0"] + wl["n"]:] = np.nan
            args = [tvm.runtime.tensor(a, device=dev) for a in inputs]
            for knobs, mod in built:
                # The outputs (for RoPE the caches too) are poisoned with NaN before the call.
                err = tpl.relative_error(inputs, lambda n: run_poisoned(mod["main"], args, n, dev))
                assert err < tpl.tolerance, (wl, knobs, err)
                us = mod.time_evaluator("main", dev, number=20, repeat=3)(*args).median * 1e6
                print(f"{name} {wl} {knobs}: {us:.1f} us, rel. error {err:.2g}")
