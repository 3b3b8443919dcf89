"""Every template against its NumPy reference on the CPU, and CUDA candidates that compile."""
import re
import shutil

import numpy as np
import pytest
import tvm

from shardtune.kernels import KnobError, all_templates, get_template
from shardtune.kernels.q4_gemv import dequantize, pack_q4, unpack_q4
from shardtune.tuner.measure import run_poisoned
from shardtune.tuner.targets import get_arch, target_of

CPU = target_of(get_arch("cpu"))
# The attention, RoPE and embedding templates take other shapes: tests/test_attention.py,
# tests/test_prefill_kernels.py, tests/test_gemm.py.
OTHER_SHAPES = ("decode_attention", "rope_kv_append", "embedding", "prefill_attention", "prefill_rope_kv_append",
                "allreduce_add_norm", "q4f16_1_gemm")
TEMPLATES = sorted(n for n in all_templates() if n not in OTHER_SHAPES)


def as_workload(name, batch, N, K):
    """A GEMV shape, or for a norm template the hidden size K."""
    return {"batch": batch, "H": K} if "norm" in name else {"batch": batch, "N": N, "K": K, "quant": "q4f16_1"}


def run_cpu(tpl, wl, knobs, seed=0):
    ex = tvm.compile(tpl.schedule(wl, knobs, CPU), target=CPU)
    inputs = tpl.inputs(wl, np.random.default_rng(seed))
    args = [tvm.runtime.tensor(a) for a in inputs]
    return tpl.relative_error(inputs, lambda n: run_poisoned(ex.mod["main"], args, n))


def test_pack_roundtrip_and_dequantize():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 16, (3, 64))
    wq = pack_q4(q)
    assert wq.dtype == np.uint32 and wq.shape == (3, 8)
    assert (unpack_q4(wq) == q).all()
    assert (wq[0, 0] & 15) == q[0, 0] and (wq[0, 0] >> 28) == q[0, 7]
    scale = np.full((3, 2), 0.5, np.float16)
    assert np.allclose(dequantize(wq, scale), (q - 7) * 0.5)


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("batch,N,K", [(1, 256, 512), (3, 64, 1024), (4, 96, 256)])
def test_template_matches_reference_on_cpu(name, batch, N, K):
    tpl = get_template(name)
    wl = as_workload(name, batch, N, K)
    cands = tpl.sample_knobs(wl, CPU, np.random.default_rng(batch * N), 3)
    assert len(cands) == 3
    for seed, knobs in enumerate(cands):   # a few random valid knob settings, fresh inputs each
        assert run_cpu(tpl, wl, knobs, seed=seed) < tpl.tolerance, knobs


def test_knob_validation():
    tpl = get_template("q4f16_1_gemv")
    tpl.validate_knobs({"rows": 4, "lanes": 16, "unroll": 1})
    tpl.validate_knobs({"rows": 4, "tx": 32, "vec": 4, "unroll": 1, "x_scope": "global", "decode": "f16x2",
                        "k_loop": "serial"})
    with pytest.raises(KnobError, match="not one of"):
        tpl.validate_knobs({"rows": 3, "lanes": 16, "unroll": 1})
    with pytest.raises(KnobError, match="missing"):
        tpl.validate_knobs({"rows": 4, "tx": 32})
    with pytest.raises(KnobError, match="object"):
        tpl.validate_knobs([1, 2])
    with pytest.raises(KeyError, match="unknown kernel template"):
        get_template("q9_gemv")


def test_source_hash_is_stable_and_short():
    tpl = get_template("q4f16_1_gemv")
    assert tpl.source_hash == get_template("q4f16_1_gemv").source_hash
    assert len(tpl.source_hash) == 16


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_candidates_compile(arch, name):
    """Default and a few random valid GPU candidates generate CUDA that nvcc accepts."""
    tpl = get_template(name)
    target = target_of(get_arch(arch))
    wl = as_workload(name, 1, 512, 4096)
    cands = tpl.sample_knobs(wl, target, np.random.default_rng(0), 4, first=[tpl.default_knobs(wl, target)])
    assert len(cands) == 4
    for knobs in cands:
        with target:
            src = tvm.compile(tpl.schedule(wl, knobs, target), target=target).mod.imports[0].inspect_source()
        assert "__global__" in src
        # Per-thread arrays hold a few loads' worth; a large one means a cached region
        # spans rows it should not (it made SiLU(gate) * up 5000x slower once).
        local = [int(n) for line in src.splitlines() if "__shared__" not in line
                 for n in re.findall(r"alignas\(\d+\) \w+ \w+\[(\d+)\]", line)]
        assert max(local) <= 256, (knobs, local)
        weight_bytes = 4 if name.startswith("q4") else 2   # a packed uint32 word, or one fp16
        if knobs["vec"] * weight_bytes == 16 and "norm" not in name:
            assert "uint4" in src   # the 16-byte weight loads the knob asks for
        if shutil.which("nvcc"):
            with target:
                cubin = tvm.support.nvcc.compile_cuda(src, target_format="cubin", compiler="nvcc")
            assert len(cubin) > 1000


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("arch", ["sm_90", "gfx1100"])
def test_every_valid_gpu_knob_setting_schedules(arch, name):
    """What check() lets through schedules (a random sample of the valid settings)."""
    import itertools

    tpl = get_template(name)
    target = target_of(get_arch(arch))
    for wl in (as_workload(name, 1, 512, 256), as_workload(name, 2, 64, 4096)):
        valid = [dict(zip(tpl.gpu_knobs, v)) for v in itertools.product(*tpl.gpu_knobs.values())]
        valid = [k for k in valid if tpl.check(wl, k, target) is None]
        rng = np.random.default_rng(len(valid))
        for i in rng.choice(len(valid), size=min(15, len(valid)), replace=False):  # a sample keeps CI fast
            tpl.schedule(wl, valid[i], target)


@pytest.mark.parametrize("arch", ["cpu", "sm_90", "gfx1100"])
def test_default_knobs_are_valid_for_every_model_shape(arch):
    from shardtune.models import PRESETS
    from shardtune.tuner.workloads import kernel_instances

    target = target_of(get_arch(arch))
    for model in PRESETS:
        for shards in (1, 2, 4, 8):
            if model == "tiny" and shards == 8:
                continue
            for quant in ("q4f16_1", "q0f16"):
                for inst in kernel_instances(model, shards, ["gemv", "norm"], quant=quant, batch=1 + shards % 4):
                    tpl = get_template(inst.template)
                    knobs = tpl.default_knobs(inst.workload, target)
                    tpl.validate_knobs(knobs)
                    assert tpl.check(inst.workload, knobs, target) is None, (inst, knobs)


def test_unrolled_k_loop_issues_every_step_without_a_loop():
    """k_loop=unrolled: no K loop left in the CUDA (ptxas may then issue all loads at once);
    refused where the steps are too many to unroll."""
    tpl = get_template("q4f16_1_gemv")
    target = target_of(get_arch("sm_90"))
    knobs = {"rows": 2, "tx": 32, "vec": 2, "unroll": 1, "x_scope": "global", "decode": "f16x2"}
    wl = as_workload("q4f16_1_gemv", 1, 512, 4096)      # 512 words a row: 8 steps of 64
    src = {}
    for k_loop in ("serial", "unrolled"):
        assert tpl.check(wl, {**knobs, "k_loop": k_loop}, target) is None
        with target:
            mod = tvm.compile(tpl.schedule(wl, {**knobs, "k_loop": k_loop}, target), target=target)
        src[k_loop] = mod.mod.imports[0].inspect_source()
    assert "for (int k_0 = 0; k_0 < 8; ++k_0)" in src["serial"]
    assert "k_0" not in src["unrolled"] and src["unrolled"].count("st_q4_dot8(wq_local") == 16
    assert "steps of K" in tpl.check(as_workload("q4f16_1_gemv", 1, 512, 8192), {**knobs, "k_loop": "unrolled"}, target)
