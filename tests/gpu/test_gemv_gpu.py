"""On a GPU: tuned candidates, the default knobs and the dlight baseline all match
the NumPy reference, measure below the copy bandwidth, and a short tune stores records."""
import numpy as np
import pytest
import tvm

import shardtune
from shardtune.database import TuningDB
from shardtune.kernels import all_templates, get_template
from shardtune.tuner.measure import Bench
from shardtune.tuner.search import seed_knobs
from shardtune.tuner.targets import get_arch, local_gpu_arch
from shardtune.tuner.workloads import kernel_instances


def _workloads(tpl):
    """A few shapes each template meets in real models (batch > 1 where it has a batch)."""
    if tpl.name in ("decode_attention", "rope_kv_append"):
        insts = kernel_instances("llama2-70b", 2, ["attention"]) + kernel_instances("llama2-7b", 1, ["attention"])
        return [i.workload for i in insts if i.template == tpl.name]
    shapes = [(1, 4096, 4096), (4, 1024, 11008), (2, 2048, 5504)]
    if "norm" in tpl.name:
        return [{"batch": b, "H": k} for b, n, k in shapes]
    return [{"batch": b, "N": n, "K": k, "quant": "q4f16_1"} for b, n, k in shapes]


# tests/gpu/test_prefill_kernels_gpu.py, tests/gpu/test_sharded_gpu.py
PREFILL = ("embedding", "prefill_attention", "prefill_rope_kv_append", "allreduce_add_norm")


@pytest.mark.parametrize("name", sorted(n for n in all_templates() if n not in PREFILL))
def test_candidates_match_reference_and_stay_under_copy_bandwidth(name):
    arch = get_arch(local_gpu_arch())
    target = tvm.target.Target(arch.target)
    tpl = get_template(name)
    bench = Bench(arch.target, "cuda")
    try:
        copy = bench.copy_bandwidth()
        bench.ceiling_gbps = copy
        rng = np.random.default_rng(0)
        for wl in _workloads(tpl):
            base = [None] if tpl.dlight_baseline else []
            seeds = seed_knobs(tpl, wl, target)[:2]   # decode attention's tensor-core settings
            cands = [*base, *tpl.sample_knobs(wl, target, rng, 5, first=[tpl.default_knobs(wl, target), *seeds])]
            assert len(cands) >= len(base) + 2   # small spaces (norms at H=1024) hold fewer
            for (path, err), knobs in zip(bench.build_many(tpl.name, wl, cands), cands):
                assert path, err
                m = bench.measure(path, tpl.name, wl)
                assert m.ok, (knobs, m.error)
                assert m.rel_error < tpl.tolerance
    finally:
        bench.close()


def test_short_gpu_tune_stores_records(tmp_path):
    db = tmp_path / "gpu.db"
    recs = shardtune.tune(arch=local_gpu_arch(), shards=1, model="tiny", db=str(db), trials_per_kernel=4,
                          progress=False)
    assert recs and all(r.arch == local_gpu_arch() and r.extra["baseline_us"] for r in recs)
    # Timed back to back inside a CUDA graph on NVIDIA (the NCCL backend's library holds the timer).
    assert {r.extra["timing"] for r in recs} == {"graph" if local_gpu_arch().startswith("sm_") else "launch"}
    assert len(TuningDB.open_existing(db)) == len(recs)


@pytest.mark.parametrize("name", ["q4f16_1_gemv", "q4f16_1_gemv_residual", "q4f16_1_gemv_silu_mul", "q0f16_gemv"])
def test_partial_last_step_matches_reference(name):
    """K = 11008 (Llama-2-7B's down projection): steps that do not divide a row end in a
    guarded partial step, which must neither drop nor double-count the row's tail."""
    import itertools

    arch = get_arch(local_gpu_arch())
    target = tvm.target.Target(arch.target)
    tpl = get_template(name)
    wl = {"batch": 1, "N": 1024, "K": 11008, "quant": "q0f16" if name.startswith("q0") else "q4f16_1"}
    row = 11008 // (1 if name.startswith("q0") else 8)
    tails = [dict(zip(tpl.gpu_knobs, v)) for v in itertools.product(*tpl.gpu_knobs.values())]
    tails = [k for k in tails if tpl.check(wl, k, target) is None and row % (k["tx"] * k["vec"] * k["unroll"])]
    rng = np.random.default_rng(1)
    cands = [tails[i] for i in rng.choice(len(tails), size=6, replace=False)]
    bench = Bench(arch.target, "cuda")
    try:
        for (path, err), knobs in zip(bench.build_many(tpl.name, wl, cands), cands):
            assert path, err
            m = bench.measure(path, tpl.name, wl)
            assert m.ok and m.rel_error < tpl.tolerance, (knobs, m.error)
    finally:
        bench.close()


@pytest.mark.parametrize("heads,knobs", [
    ((32, 4), {"parts": 16, "unroll": 1}),    # 70B TP2, 34B TP2: the records builds take at 1024 rows
    ((40, 40), {"parts": 8, "unroll": 1}),    # 13B TP1
    ((32, 8), {"parts": 8, "unroll": 2}),     # Llama-3-8B TP1
])
def test_cluster_attention_as_a_build_runs_it(heads, knobs):
    """Decode attention merged inside a cluster, compiled the way a build compiles it (with PDL),
    one kernel for every length: short ones leave most of the cluster's blocks without rows."""
    from shardtune.compiler.pdl import pdl_pipeline

    target = tvm.target.Target(get_arch(local_gpu_arch()).target)
    if not target.attrs["arch"].startswith("sm_9"):
        pytest.skip("clusters and PDL need sm_90")
    tpl = get_template("decode_attention")
    wl = {"batch": 1, "capacity": 4096, "dtype": "float16", "head_dim": 128, "kv_heads": heads[1],
          "length": 1024, "q_heads": heads[0]}
    knobs = {"threads": 128, "tpt": 4, "vec": 8, "kv_split": 1, "mma": 1, "cluster": 1, **knobs}
    assert tpl.check(wl, knobs, target) is None
    run = tvm.compile(tpl.schedule(wl, knobs, target), target=target, tir_pipeline=pdl_pipeline())["main"]
    dev, rng = tvm.cuda(0), np.random.default_rng(3)
    inputs = tpl.inputs(wl, rng)
    args = [tvm.runtime.tensor(a, dev) for a in inputs]
    for length in (1, 2, 37, 300, 1024, 4095, 4096):
        inputs[3][0] = length - 1
        args[3].copyfrom(inputs[3])
        run(*args)
        ref = tpl.reference(inputs).astype(np.float32)
        np.testing.assert_allclose(args[4].numpy().astype(np.float32), ref, atol=2e-3, rtol=2e-3,
                                   err_msg=f"length {length}")
