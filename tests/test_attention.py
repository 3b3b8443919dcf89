"""The decode-step templates (rope_kv_append, decode_attention): numerics against NumPy on the
CPU, CUDA (and ROCm) code generation, the GPU kernels' numerics with their generated CUDA C run
on CPU threads (no GPU here), Relax call_tir_inplace, knobs and workloads."""
import itertools
import shutil

import numpy as np
import pytest
import tvm

from shardtune.errors import UserError
from shardtune.kernels import KnobError, get_template
from shardtune.kernels.rope_kv_append import Inputs
from shardtune.tuner.measure import run_poisoned
from shardtune.tuner.targets import get_arch, target_of
from emulator import emulate   # tests/ is on sys.path under pytest: generated CUDA C on CPU threads

CPU = target_of(get_arch("cpu"))
SM90 = target_of(get_arch("sm_90"))
ROPE, ATTN = get_template("rope_kv_append"), get_template("decode_attention")


def heads(q, kv, d, capacity, dtype, **extra):
    return {"batch": 1, "q_heads": q, "kv_heads": kv, "head_dim": d, "capacity": capacity, "dtype": dtype, **extra}


TINY = heads(8, 4, 32, 512, "float16")            # the tiny preset (grouped-query, 2 per KV head)
GQA = heads(16, 2, 64, 256, "float32")            # 8 query heads per KV head
MHA = heads(4, 4, 128, 128, "float16")
L70B = heads(32, 4, 128, 4096, "float16")         # Llama-2-70B, one of two shards


def run_cpu(tpl, wl, knobs, inputs):
    mod = tpl.schedule(wl, knobs, CPU) if knobs is not None else tvm.IRModule({"main": tpl.compute(wl)})
    ex = tvm.compile(mod, target=CPU)
    args = [tvm.runtime.tensor(a) for a in inputs]
    return tpl.relative_error(inputs, lambda n: run_poisoned(ex.mod["main"], args, n))


def tolerance(wl):
    return ATTN.tolerance if wl["dtype"] == "float16" else 1e-4


# --- CPU numerics ------------------------------------------------------------------------

@pytest.mark.parametrize("wl", [TINY, GQA, MHA, {**TINY, "dtype": "float32"}], ids=["tiny", "gqa", "mha", "tiny32"])
def test_attention_matches_reference_on_cpu(wl):
    C = wl["capacity"]
    settings = [None, *({"tile": t} for t in ATTN.cpu_knobs["tile"])]   # the compute, then each CPU knob
    for i, (length, knobs) in enumerate(zip((1, 77, C, C // 2), settings)):
        inputs = ATTN.inputs({**wl, "length": length}, np.random.default_rng(i))
        assert run_cpu(ATTN, {**wl, "length": length}, knobs, inputs) < tolerance(wl), (length, knobs)


def test_attention_reads_no_row_past_pos():
    """NaN in every cache row after pos: any read of one (even weighted by 0) would show."""
    wl = {**GQA, "length": 100}
    inputs = ATTN.inputs(wl, np.random.default_rng(0))
    for cache in inputs[1:3]:
        cache[:, 100:] = np.nan
    for knobs in (None, ATTN.default_knobs(wl, CPU)):
        assert run_cpu(ATTN, wl, knobs, inputs) < 1e-4


@pytest.mark.parametrize("wl", [{**TINY, "theta": 10000.0}, {**GQA, "theta": 500000.0}, {**L70B, "theta": 1e6}],
                         ids=["tiny", "gqa32", "70b"])
def test_rope_matches_reference_on_cpu(wl):
    for i, knobs in enumerate([None, *({"parallel": p} for p in ROPE.cpu_knobs["parallel"])]):
        inputs = ROPE.inputs(wl, np.random.default_rng(i))
        if i == 1:
            inputs[1][0] = 5                       # not only the last row
        assert run_cpu(ROPE, wl, knobs, inputs) < tolerance(wl), knobs


def test_rope_reference_rotates_pairs():
    """Position 0 is the identity; a rotation keeps each pair's length (Hugging Face's halves)."""
    wl = heads(2, 1, 8, 4, "float32", theta=10000.0)
    qkv, pos, k, v, q = ROPE.inputs(wl, np.random.default_rng(0))
    k_ref, v_ref, q_ref = ROPE.reference(Inputs([qkv, np.array([0], np.int32), k, v, q], wl))
    assert np.allclose(q_ref.reshape(-1), qkv[0, :16]) and np.allclose(k_ref[0, 0], qkv[0, 16:24])
    assert (v_ref[0, 0] == qkv[0, 24:]).all() and (k_ref[:, 1:] == k[:, 1:]).all()
    _, _, q3 = ROPE.reference(Inputs([qkv, np.array([3], np.int32), k, v, q], wl))
    x = qkv[0, :8]
    assert np.allclose(q3[0, 0, :4] ** 2 + q3[0, 0, 4:] ** 2, x[:4] ** 2 + x[4:] ** 2, atol=1e-5)
    assert np.isclose(q3[0, 0, 0], x[0] * np.cos(3.0) - x[4] * np.sin(3.0), atol=1e-6)
    assert np.isclose(q3[0, 0, 5], x[5] * np.cos(3 * 1e4 ** -0.25) + x[1] * np.sin(3 * 1e4 ** -0.25), atol=1e-6)


def test_rope_past_capacity_writes_no_cache_row():
    """relative_error poisons the caches: every row must still be NaN after the call."""
    wl = {**TINY, "dtype": "float32", "theta": 10000.0}
    inputs = ROPE.inputs(wl, np.random.default_rng(0))
    inputs[1][0] = wl["capacity"]
    for knobs in (None, ROPE.default_knobs(wl, CPU)):
        assert run_cpu(ROPE, wl, knobs, inputs) < 1e-4


# --- Relax -----------------------------------------------------------------------------------

def decode_step_module(wl, rope_func, attn_func):
    """rope_kv_append through call_tir_inplace (caches updated in place), then attention."""
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op, spec

    Hq, Hkv, D, C, dt = wl["q_heads"], wl["kv_heads"], wl["head_dim"], wl["capacity"], wl["dtype"]

    def new(specs):
        return [nn.Tensor.placeholder(list(shape), dtype) for shape, dtype in specs]

    class Step(nn.Module):
        def forward(self, qkv, pos, k_cache, v_cache):
            k, v, q = op.tensor_ir_inplace_op(rope_func, "rope", [qkv, pos, k_cache, v_cache], [2, 3, -1],
                                              new([((Hkv, C, D), dt)] * 2 + ROPE.output_specs(wl)))
            out = op.tensor_ir_op(attn_func, "attention", [q, k, v, pos], new(ATTN.output_specs(wl)))
            return out[0], k, v

    cache = spec.Tensor([Hkv, C, D], dt)
    mod, _ = Step().export_tvm(spec={"forward": {"qkv": spec.Tensor([1, (Hq + 2 * Hkv) * D], dt),
                                                 "pos": spec.Tensor([1], "int32"), "k_cache": cache, "v_cache": cache}})
    return mod


@pytest.mark.parametrize("scheduled", [False, True])
def test_relax_decode_step_updates_cache_in_place(scheduled):
    from tvm import relax

    wl = {**TINY, "capacity": 64, "dtype": "float32", "theta": 10000.0, "length": 10}
    funcs = [t.schedule(wl, t.default_knobs(wl, CPU), CPU)["main"] if scheduled else t.compute(wl)
             for t in (ROPE, ATTN)]
    vm = relax.VirtualMachine(tvm.compile(decode_step_module(wl, *funcs), target=CPU), tvm.cpu())
    inputs = ROPE.inputs(wl, np.random.default_rng(0))
    inputs[1][0] = wl["length"] - 1
    args = [tvm.runtime.tensor(a) for a in inputs[:4]]
    out, k, v = vm["forward"](*args)
    k_ref, v_ref, q_ref = ROPE.reference(inputs)
    assert np.abs(args[2].numpy() - k_ref).max() < 1e-5 and np.abs(args[3].numpy() - v_ref).max() == 0
    assert (k.numpy() == args[2].numpy()).all()        # the output is the input cache, updated
    ref = ATTN.reference([q_ref, k_ref, v_ref, inputs[1]])
    assert np.abs(out.numpy() - ref).max() < 1e-5


def test_relax_decode_step_builds_for_cuda():
    wl = {**L70B, "theta": 10000.0, "length": 1024}
    funcs = [t.schedule(wl, t.default_knobs(wl, SM90), SM90)["main"] for t in (ROPE, ATTN)]
    with SM90:
        tvm.compile(decode_step_module(wl, *funcs), target=SM90)


# --- GPU code -------------------------------------------------------------------------------

def cuda_source(tpl, wl, knobs, target=SM90):
    with target:
        return tvm.compile(tpl.schedule(wl, knobs, target), target=target).mod.imports[0].inspect_source()


@pytest.mark.parametrize("tpl,wl", [(ATTN, {**L70B, "length": 4096}), (ATTN, {**TINY, "length": 128}),
                                    (ROPE, {**L70B, "theta": 10000.0}), (ROPE, {**TINY, "theta": 10000.0})],
                         ids=["attention-70b", "attention-tiny", "rope-70b", "rope-tiny"])
def test_cuda_candidates_compile(tpl, wl):
    """Default and sampled GPU knobs generate CUDA; nvcc builds the default."""
    cands = tpl.sample_knobs(wl, SM90, np.random.default_rng(0), 4, first=[tpl.default_knobs(wl, SM90)])
    assert len(cands) == 4
    for i, knobs in enumerate(cands):
        src = cuda_source(tpl, wl, knobs)
        assert "__global__" in src
        if knobs["vec"] * np.dtype(wl["dtype"]).itemsize == 16:
            assert "uint4" in src               # the 16-byte loads the knob asks for
        if i == 0 and shutil.which("nvcc"):
            with SM90:
                assert len(tvm.support.nvcc.compile_cuda(src, target_format="cubin", compiler="nvcc")) > 1000


def test_every_valid_gpu_knob_setting_schedules():
    """What check() lets through builds its PrimFunc, for CUDA and AMD targets (a sample)."""
    rng = np.random.default_rng(0)
    for arch in ("sm_90", "gfx1100"):
        target = tvm.target.Target(get_arch(arch).target)
        for tpl, wl, count in ((ATTN, {**L70B, "length": 1024}, 3), (ROPE, {**GQA, "theta": 1e4}, 2)):
            valid = [dict(zip(tpl.gpu_knobs, v)) for v in itertools.product(*tpl.gpu_knobs.values())]
            valid = [k for k in valid if tpl.check(wl, k, target) is None]
            assert valid
            for i in rng.choice(len(valid), size=min(count, len(valid)), replace=False):   # a sample: CI time
                tpl.schedule(wl, valid[i], target)


def test_rocm_code_generation():
    try:
        target = target_of(get_arch("gfx1100"))
    except UserError as e:
        pytest.skip(str(e))
    for tpl, wl in ((ATTN, {**TINY, "length": 128}), (ROPE, {**TINY, "theta": 1e4})):
        tvm.compile(tpl.schedule(wl, tpl.default_knobs(wl, target), target), target=target)


MMA = {"mma": 1, "tpt": 4, "vec": 8, "kv_split": 1, "cluster": 0}   # tensor-core kernel 1 (attention_mma.py)
CLUSTER = MMA | {"cluster": 1}   # one kernel: a KV head's partitions merge in their cluster


@pytest.mark.parametrize("wl,knobs", [
    ({**TINY, "length": 100}, None),
    ({**heads(16, 2, 128, 256, "float16"), "length": 200}, {"parts": 8, "threads": 128, "tpt": 16, "vec": 8,
                                                             "unroll": 2, "kv_split": 2, "mma": 0, "cluster": 0}),
    ({**GQA, "length": 1}, {"parts": 16, "threads": 64, "tpt": 8, "vec": 4, "unroll": 1, "kv_split": 2, "mma": 0, "cluster": 0}),
    ({**heads(32, 4, 128, 512, "float16"), "length": 300}, MMA | {"parts": 4, "threads": 64, "unroll": 2}),
    ({**heads(8, 2, 128, 256, "float16"), "length": 37}, MMA | {"parts": 4, "threads": 128, "unroll": 1}),
    ({**TINY, "length": 100}, MMA | {"parts": 2, "threads": 64, "unroll": 1}),
    ({**heads(32, 4, 128, 512, "float16"), "length": 300}, CLUSTER | {"parts": 4, "threads": 64, "unroll": 2}),
    # 8 partitions, of which the length fills 3: the idle blocks' partials must weigh nothing
    ({**heads(8, 2, 128, 512, "float16"), "length": 37}, CLUSTER | {"parts": 8, "threads": 64, "unroll": 1}),
], ids=["tiny-default", "gqa-split", "fp32-length1", "mma-70b", "mma-g4-short", "mma-tiny", "cluster-70b",
        "cluster-g4-idle-blocks"])
def test_attention_gpu_kernels_on_cpu_threads(wl, knobs, tmp_path):
    """The CUDA C of the kernels, run as GPU threads on the CPU; rows past pos hold NaN."""
    knobs = knobs or ATTN.default_knobs(wl, SM90)
    assert ATTN.check(wl, knobs, SM90) is None
    kernels = list(emulate(cuda_source(ATTN, wl, knobs), tmp_path).values())
    assert len(kernels) == (1 if knobs.get("cluster") else 2)
    partial, merge = kernels if len(kernels) == 2 else (kernels[0], None)
    inputs = ATTN.inputs(wl, np.random.default_rng(0))
    for cache in inputs[1:3]:
        cache[:, wl["length"]:] = np.nan

    def run(n):
        arrays = dict(zip(["q", "k_cache", "v_cache", "pos", "out", "part_acc", "part_ml"], inputs))
        for name in ("out", "part_acc", "part_ml"):
            arrays[name][...] = np.nan
        partial(arrays, knobs["parts"], wl["kv_heads"] * knobs["kv_split"], knobs["parts"] if merge is None else 1)
        if merge is not None:
            merge(arrays, wl["q_heads"])
        return [arrays[name] for name in ("out", "part_acc", "part_ml")][-n:]
    assert ATTN.relative_error(inputs, run) < tolerance(wl)


def test_rope_gpu_kernel_on_cpu_threads(tmp_path):
    """Two knob settings, and dlight's schedule of the compute (the baseline: 3 kernels, 1 block each),
    at the last row of the cache and past it."""
    wl = {**TINY, "theta": 10000.0}
    for knobs in (ROPE.default_knobs(wl, SM90), {"vec": 2, "heads_per_block": 4}, None):
        mod = ROPE.dlight_schedule(wl, SM90) if knobs is None else ROPE.schedule(wl, knobs, SM90)
        with SM90:
            kernels = emulate(tvm.compile(mod, target=SM90).mod.imports[0].inspect_source(), tmp_path)
        inputs = ROPE.inputs(wl, np.random.default_rng(0))

        def run(n):
            arrays = dict(zip(["qkv", "pos", "k_cache", "v_cache", "q_out"], [a.copy() for a in inputs]))
            for name in ("k_cache", "v_cache", "q_out"):
                arrays[name][...] = np.nan
            blocks = 1 if knobs is None else -(-(wl["q_heads"] + 2 * wl["kv_heads"]) // knobs["heads_per_block"])
            for kernel in kernels.values():
                kernel(arrays, blocks)
            return [arrays["k_cache"], arrays["v_cache"], arrays["q_out"]]
        assert ROPE.relative_error(inputs, run) < tolerance(wl), knobs
        inputs[1][0] = wl["capacity"]      # past the capacity: q_out only, no cache row
        assert ROPE.relative_error(inputs, run) < tolerance(wl), knobs


# --- knobs and workloads --------------------------------------------------------------------

def test_knob_validation():
    wl = {**L70B, "length": 4096}
    ATTN.validate_knobs(ATTN.default_knobs(wl, SM90))
    ATTN.validate_knobs({"tile": 8})
    ROPE.validate_knobs({"vec": 8, "heads_per_block": 2})
    ROPE.validate_knobs({"parallel": "heads"})
    with pytest.raises(KnobError, match="not one of"):
        ATTN.validate_knobs({**ATTN.default_knobs(wl, SM90), "tpt": 3})
    with pytest.raises(KnobError, match="missing"):
        ROPE.validate_knobs({"vec": 8})
    good = {"parts": 64, "threads": 128, "tpt": 16, "vec": 8, "unroll": 2, "kv_split": 1, "mma": 0, "cluster": 0}
    assert ATTN.check(wl, good, SM90) is None
    assert "16 bytes" in ATTN.check({**wl, "dtype": "float32"}, good, SM90)
    assert "divide head_dim" in ATTN.check(wl, {**good, "tpt": 32}, SM90)
    assert "kv_split" in ATTN.check(heads(4, 4, 128, 4096, "float16", length=1), {**good, "kv_split": 2}, SM90)
    assert "partitions" in ATTN.check({**wl, "capacity": 512}, {**good, "parts": 128}, SM90)
    assert "registers" in ATTN.check(wl, {**good, "tpt": 4, "vec": 8}, SM90)
    assert "16 bytes" in ROPE.check({**GQA, "theta": 1e4}, {"vec": 8, "heads_per_block": 1}, SM90)
    # the tensor-core kernel: fp16 on sm_80+, at most 8 query heads per KV head, one thread mapping
    mma = {**good, **MMA, "parts": 16}
    assert ATTN.check(wl, mma, SM90) is None
    assert "sm_80" in ATTN.check(wl, mma, tvm.target.Target({"kind": "cuda", "arch": "sm_75"}))
    assert "at most 8" in ATTN.check(heads(64, 4, 128, 4096, "float16", length=1), mma, SM90)
    assert "stand for it" in ATTN.check(wl, {**mma, "tpt": 8}, SM90)
    assert "registers" in ATTN.check(wl, {**mma, "unroll": 4}, SM90)
    # the in-cluster merge: the tensor-core kernel on sm_90, at most 16 partitions (a cluster)
    assert ATTN.check(wl, {**mma, "cluster": 1}, SM90) is None
    assert "needs mma=1" in ATTN.check(wl, {**good, "cluster": 1}, SM90)
    assert "sm_90" in ATTN.check(wl, {**mma, "cluster": 1}, tvm.target.Target({"kind": "cuda", "arch": "sm_80"}))
    assert "at most 16" in ATTN.check(wl, {**mma, "cluster": 1, "parts": 32}, SM90)


@pytest.mark.parametrize("arch", ["cpu", "sm_90", "gfx1100"])
def test_default_knobs_are_valid_for_every_model_shape(arch):
    from shardtune.models import PRESETS
    from shardtune.tuner.workloads import kernel_instances

    target = tvm.target.Target(get_arch(arch).target)
    for model in PRESETS:
        for shards in (1, 2, 4, 8):
            try:
                instances = kernel_instances(model, shards, ["attention"])
            except UserError:        # more shards than KV heads
                continue
            for inst in instances:
                tpl = get_template(inst.template)
                knobs = tpl.default_knobs(inst.workload, target)
                tpl.validate_knobs(knobs)
                assert tpl.check(inst.workload, knobs, target) is None, (inst, knobs)


def test_attention_workloads():
    from shardtune.tuner.workloads import kernel_instances

    insts = kernel_instances("llama2-70b", 2, ["attention"])
    assert [i.template for i in insts] == ["rope_kv_append"] + ["decode_attention"] * 3
    assert insts[0].workload == {**L70B, "theta": 10000.0} and insts[0].calls_per_token == 80
    assert [i.workload["length"] for i in insts[1:]] == [128, 1024, 4096]
    tiny = kernel_instances("tiny", 1, ["attention"])   # a 512-token context: capacity 512
    assert [(i.template, i.workload.get("length")) for i in tiny] == [("rope_kv_append", None),
                                                                       ("decode_attention", 128)]
    assert tiny[0].workload["capacity"] == 512 and tiny[0].workload["q_heads"] == 8
    assert kernel_instances("llama3-8b", 1, ["attention"])[0].workload["theta"] == 500000.0
    both = kernel_instances("llama2-7b", 1, ["gemv", "attention"])
    assert {i.template for i in both} >= {"q4f16_1_gemv", "decode_attention", "rope_kv_append"}


def test_bytes_moved_grow_with_length():
    short, long = ATTN.bytes_moved({**L70B, "length": 128}), ATTN.bytes_moved({**L70B, "length": 4096})
    assert long - short == 2 * 4 * (4096 - 128) * 128 * 2
    assert abs(long - 8 * 2 ** 20) < 2 ** 15     # 8 MiB of K and V at 4096 tokens


@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm"])
def test_norm_gpu_kernels_on_cpu_threads(tmp_path, name):
    """The hand-written GPU norms (weight loaded first, row in registers, warp shuffles, one block
    per row) against the NumPy reference, at three knob settings, batch 2."""
    tpl, wl = get_template(name), {"batch": 2, "H": 1024}
    for knobs in ({"threads": 64, "vec": 1}, {"threads": 128, "vec": 4}, {"threads": 256, "vec": 2}):
        with SM90:
            kernels = emulate(tvm.compile(tpl.schedule(wl, knobs, SM90), target=SM90).mod.imports[0].inspect_source(),
                              tmp_path)
        inputs = tpl.inputs(wl, np.random.default_rng(1))
        names = ["x", "residual", "weight", "y", "h"] if tpl.add else ["x", "weight", "y"]

        def run(n):
            arrays = dict(zip(names, [a.copy() for a in inputs]))
            for out in ("y", "h") if tpl.add else ("y",):
                arrays[out][...] = np.nan
            for kernel in kernels.values():
                kernel(arrays, wl["batch"])
            out = [arrays["y"], arrays["h"]] if tpl.add else [arrays["y"]]
            return out[-n:]
        assert tpl.relative_error(inputs, run) < tpl.tolerance, knobs
