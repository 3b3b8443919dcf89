"""The prefill GEMM template (q4f16_1_gemm): numerics on the CPU, its tensor-core CUDA run on CPU
threads (wmma emulated), CUDA that nvcc accepts, knob checks, and dlight on ROCm."""
import itertools
import shutil

import numpy as np
import pytest
import tvm

from shardtune.kernels import PASS_CONFIG, get_template
from shardtune.tuner.measure import run_poisoned
from shardtune.tuner.targets import get_arch, target_of
from emulator import emulate   # tests/ is on sys.path under pytest: generated CUDA C on CPU threads

CPU = target_of(get_arch("cpu"))
SM90 = target_of(get_arch("sm_90"))
GEMM = get_template("q4f16_1_gemm")


def cuda_source(wl, knobs):
    """The kernel's CUDA C as builds compile it (cp.async on: PASS_CONFIG)."""
    with SM90, tvm.transform.PassContext(config=PASS_CONFIG):
        return tvm.compile(GEMM.schedule(wl, knobs, SM90), target=SM90).mod.imports[0].inspect_source()


def valid_gpu_knobs(wl):
    space = [dict(zip(GEMM.gpu_knobs, v)) for v in itertools.product(*GEMM.gpu_knobs.values())]
    return [k for k in space if GEMM.check(wl, k, SM90) is None]


@pytest.mark.parametrize("M,N,K", [(1, 64, 128), (16, 256, 512), (37, 96, 256)])
def test_gemm_matches_reference_on_cpu(M, N, K):
    wl = {"M": M, "N": N, "K": K}
    for seed, knobs in enumerate([None, {"n_tile": 8}, {"n_tile": 32}]):
        if knobs is not None and GEMM.check(wl, knobs, CPU):
            continue
        mod = GEMM.schedule(wl, knobs, CPU) if knobs else tvm.IRModule({"main": GEMM.compute(wl)})
        ex = tvm.compile(mod, target=CPU)
        inputs = GEMM.inputs(wl, np.random.default_rng(seed))
        args = [tvm.runtime.tensor(a) for a in inputs]
        assert GEMM.relative_error(inputs, lambda n: run_poisoned(ex.mod["main"], args, n)) < GEMM.tolerance, knobs


def test_reference_rounds_the_weights_to_fp16():
    """The weights are fp16 on the tensor cores: (q - 7) * scale rounded, as dequantize_q4 wrote them."""
    wl = {"M": 2, "N": 8, "K": 64}
    x, wq, scale, _ = GEMM.inputs(wl, np.random.default_rng(0))
    scale[...] = np.float16(0.0123)            # (q - 7) * 0.0123 needs more than fp16's mantissa
    from shardtune.kernels.q4_gemv import dequantize
    exact = x.astype(np.float32) @ dequantize(wq, scale).T
    assert not np.array_equal(GEMM.reference([x, wq, scale]), exact.astype(np.float16))


@pytest.mark.parametrize("wl,knobs", [
    ({"M": 16, "N": 128, "K": 256}, None),                                        # default: a prompt bucket
    ({"M": 40, "N": 64, "K": 256}, None),                                         # M padded to the block's rows
    ({"M": 5, "N": 64, "K": 128}, {"warps_m": 1, "warps_n": 2, "tiles_m": 1, "tiles_n": 2, "k_tiles": 2,
                                   "pipeline": 0}),
    ({"M": 32, "N": 128, "K": 256}, {"warps_m": 1, "warps_n": 1, "tiles_m": 2, "tiles_n": 4, "k_tiles": 4,
                                     "pipeline": 1}),
    ({"M": 16, "N": 128, "K": 256}, {"warps_m": 1, "warps_n": 4, "tiles_m": 1, "tiles_n": 1, "k_tiles": 4,
                                     "pipeline": 0}),
], ids=["bucket16", "padded40", "short5", "four-tiles", "unpipelined"])
def test_gemm_tensor_core_kernel_on_cpu_threads(wl, knobs, tmp_path):
    """Every output written from the right rows: y starts as NaN; x's padding rows must not leak."""
    knobs = knobs or GEMM.default_knobs(wl, SM90)
    assert GEMM.check(wl, knobs, SM90) is None, knobs
    src = cuda_source(wl, knobs)
    assert "wmma::mma_sync" in src and ("cp.async.ca" in src) == bool(knobs["pipeline"])
    (kernel,) = emulate(src, tmp_path).values()
    inputs = GEMM.inputs(wl, np.random.default_rng(1))
    bm, bn = 16 * knobs["warps_m"] * knobs["tiles_m"], 16 * knobs["warps_n"] * knobs["tiles_n"]

    def run(n):
        arrays = dict(zip(["x", "wq", "scale", "y"], inputs))
        arrays["y"][...] = np.nan
        kernel(arrays, -(-wl["M"] // bm), wl["N"] // bn, block_x=32)
        return [arrays["y"]]
    assert GEMM.relative_error(inputs, run) < GEMM.tolerance


def test_gemm_cuda_compiles_for_model_shapes():
    """Default knobs for each bucket at Llama-2-7B's shapes, and a sample of valid settings."""
    for M, N, K in [(16, 12288, 4096), (64, 22016, 4096), (256, 4096, 11008), (100, 1280, 8192)]:
        wl = {"M": M, "N": N, "K": K}
        valid = valid_gpu_knobs(wl)
        rng = np.random.default_rng(M)
        for knobs in [GEMM.default_knobs(wl, SM90), *(valid[i] for i in rng.choice(len(valid), 2, replace=False))]:
            src = cuda_source(wl, knobs)
            assert src.count("wmma::mma_sync") >= 1 and "uint4" not in src.split("mma_sync")[0][-200:]
            if shutil.which("nvcc"):
                with SM90:
                    assert len(tvm.support.nvcc.compile_cuda(src, target_format="cubin", compiler="nvcc")) > 1000


def test_gemm_checks_and_defaults():
    wl = {"M": 16, "N": 4096, "K": 4096}
    default = GEMM.default_knobs(wl, SM90)
    GEMM.validate_knobs(default)
    # 16 rows: a block of 4 warps per 64 columns (64 blocks for N 4096), 64-wide K steps, 2 ahead
    assert (default["tiles_m"], default["warps_n"], default["k_tiles"], default["pipeline"]) == (1, 4, 4, 2)
    assert "does not divide" in GEMM.check({"M": 16, "N": 96, "K": 4096}, {**default, "tiles_n": 2}, SM90)
    assert "exceed" in GEMM.check(wl, {**default, "tiles_m": 2}, SM90)
    big = {"warps_m": 4, "warps_n": 8, "tiles_m": 4, "tiles_n": 4, "k_tiles": 4, "pipeline": 0}
    assert "shared memory" in GEMM.check({"M": 256, "N": 4096, "K": 4096}, big, SM90)
    for M in (1, 16, 40, 64, 100, 256, 512):
        for N, K in ((4096, 4096), (22016, 4096), (4096, 11008), (1280, 8192), (96, 64)):
            knobs = GEMM.default_knobs({"M": M, "N": N, "K": K}, SM90)
            assert GEMM.check({"M": M, "N": N, "K": K}, knobs, SM90) is None
    rocm = target_of(get_arch("gfx1100"))
    assert "CUDA" in GEMM.check(wl, default, rocm)
    assert GEMM.untuned_uses_dlight(rocm) and not GEMM.untuned_uses_dlight(SM90)
    assert GEMM.dlight_schedule(wl, rocm) is not None


def test_gemm_workloads_follow_the_buckets_and_shards():
    from shardtune.errors import UserError
    from shardtune.tuner.workloads import kernel_instances

    one = kernel_instances("llama2-7b", 1, ["gemm"])
    assert {(i.workload["M"], i.workload["N"], i.workload["K"]) for i in one} == {
        (m, n, k) for m in (16, 64, 256) for n, k in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))}
    assert all(i.template == "q4f16_1_gemm" and i.calls_per_token == 32 for i in one)
    two = {(i.layers, i.workload["M"]): i.workload for i in kernel_instances("llama2-70b", 2, ["gemv", "gemm"])
           if i.template == "q4f16_1_gemm"}
    assert two[(("down",), 16)] == {"M": 16, "N": 8192, "K": 14336}   # row-parallel: K split
    assert two[(("qkv",), 64)] == {"M": 64, "N": 5120, "K": 8192}     # column-parallel: N split
    with pytest.raises(UserError, match="q4f16_1's prefill GEMM"):
        kernel_instances("tiny", 1, ["gemm"], quant="q0f16")


def test_cpu_tune_stores_checked_gemm_records(tmp_path):
    """tune --kernels gemm on this CPU: one record per bucket and layer shape, each checked."""
    import shardtune

    recs = shardtune.tune(arch="cpu", shards=1, model="tiny", db=str(tmp_path / "t.db"), kernels=["gemm"],
                          trials_per_kernel=1)
    assert {r.template for r in recs} == {"q4f16_1_gemm"}
    assert sorted({r.workload["M"] for r in recs}) == [16, 64, 256]
    assert all(r.max_rel_error < GEMM.tolerance for r in recs)


def test_gemm_tune_for_amd_is_one_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "shardtune", "tune", "--arch", "gfx1100", "--kernels", "gemm",
                        "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and "NVIDIA only" in r.stderr and r.stderr.count("\n") == 1, r.stderr
