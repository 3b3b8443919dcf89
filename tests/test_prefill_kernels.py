"""The prefill templates (embedding, prefill_rope_kv_append, prefill_attention): numerics against
NumPy on the CPU, CUDA code generation for sm_90 without a GPU, the GPU kernels' numerics with
their generated CUDA C run on CPU threads, a Relax prefill step, knobs and the model shapes."""
import itertools
import shutil

import numpy as np
import pytest
import tvm

from shardtune.errors import UserError
from shardtune.kernels import get_template
from shardtune.kernels.rope_kv_append import Inputs
from shardtune.tuner.measure import run_poisoned
from shardtune.tuner.targets import get_arch, target_of
from emulator import emulate   # tests/ is on sys.path under pytest: generated CUDA C on CPU threads

CPU = target_of(get_arch("cpu"))
SM90 = target_of(get_arch("sm_90"))
EMB, ROPE, ATTN = (get_template(n) for n in ("embedding", "prefill_rope_kv_append", "prefill_attention"))
DECODE_ROPE, DECODE_ATTN = get_template("rope_kv_append"), get_template("decode_attention")


def heads(q, kv, d, capacity, dtype, n, **extra):
    return {"n": n, "q_heads": q, "kv_heads": kv, "head_dim": d, "capacity": capacity, "dtype": dtype, **extra}


def run_cpu(tpl, wl, knobs, inputs=None, seed=0):
    mod = tpl.schedule(wl, knobs, CPU) if knobs is not None else tvm.IRModule({"main": tpl.compute(wl)})
    ex = tvm.compile(mod, target=CPU)
    inputs = tpl.inputs(wl, np.random.default_rng(seed)) if inputs is None else inputs
    args = [tvm.runtime.tensor(a) for a in inputs]
    return tpl.relative_error(inputs, lambda n: run_poisoned(ex.mod["main"], args, n))


def cpu_settings(tpl):
    """The unscheduled compute (None), then every CPU knob setting."""
    return [None, *(dict(zip(tpl.cpu_knobs, v)) for v in itertools.product(*tpl.cpu_knobs.values()))]


def tolerance(tpl, wl):
    return 1e-5 if wl.get("dtype") == "float32" or wl.get("quant") == "q0f32" else tpl.tolerance


def cuda_source(tpl, wl, knobs):
    with SM90:
        return tvm.compile(tpl.schedule(wl, knobs, SM90), target=SM90).mod.imports[0].inspect_source()


def nvcc_builds(src):
    if shutil.which("nvcc"):
        with SM90:
            assert len(tvm.support.nvcc.compile_cuda(src, target_format="cubin", compiler="nvcc")) > 1000


# --- CPU numerics ------------------------------------------------------------------------

@pytest.mark.parametrize("wl", [{"n": 7, "vocab": 100, "H": 256, "quant": "q0f16"},
                                {"n": 1, "vocab": 50, "H": 96, "quant": "q4f16_1"},
                                {"n": 5, "vocab": 64, "H": 128, "quant": "q0f32"}], ids=lambda wl: wl["quant"])
def test_embedding_matches_reference_on_cpu(wl):
    for seed, knobs in enumerate(cpu_settings(EMB)):
        assert run_cpu(EMB, wl, knobs, seed=seed) < tolerance(EMB, wl), knobs


def test_embedding_reference_dequantizes_as_q4_gemv():
    """Element 8w + e is nibble e of word w (low nibble first), value (q - 7) * scale."""
    wl = {"n": 2, "vocab": 3, "H": 32, "quant": "q4f16_1"}
    ids, wq, scale, out = EMB.inputs(wl, np.random.default_rng(0))
    q = (wq[ids[1], 1] >> 8) & 15          # element 8 * 1 + 2 of the second token's row
    assert EMB.reference([ids, wq, scale, out])[1, 10] == np.float16((float(q) - 7) * float(scale[ids[1], 0]))


# GQA (2 and 8 query heads per KV head), pos0 > 0, n not a multiple of the CPU tile (8) or the
# GPU tiles, and a prompt running past the capacity (those positions write no cache row).
ROPE_WLS = [heads(8, 4, 32, 64, "float32", 5, theta=10000.0, pos0=7),
            heads(16, 2, 64, 64, "float16", 9, theta=500000.0, pos0=60),
            heads(4, 4, 128, 32, "float16", 13, theta=1e6)]


@pytest.mark.parametrize("wl", ROPE_WLS, ids=["gqa32", "gqa-past-capacity", "mha-end"])
def test_prefill_rope_matches_reference_on_cpu(wl):
    for seed, knobs in enumerate(cpu_settings(ROPE)):
        assert run_cpu(ROPE, wl, knobs, seed=seed) < tolerance(ROPE, wl), knobs


def test_prefill_rope_reference_is_rope_kv_append_token_by_token():
    wl = ROPE_WLS[0]
    qkv, pos, k, v, q = inputs = ROPE.inputs(wl, np.random.default_rng(1))
    k_ref, v_ref, q_ref = ROPE.reference(inputs)
    for t in range(wl["n"]):
        k, v, q_t = DECODE_ROPE.reference(Inputs([qkv[t:t + 1], pos + t, k, v, q[t:t + 1]], wl))
        assert (q_t[0] == q_ref[t]).all()
    assert (k == k_ref).all() and (v == v_ref).all()


ATTN_WLS = [heads(8, 4, 32, 64, "float32", 5, pos0=7),           # GQA 2, pos0 > 0
            heads(16, 2, 32, 96, "float16", 11, pos0=40),        # GQA 8, n not a multiple of any tile
            heads(4, 4, 128, 64, "float16", 33),                 # MHA, empty cache, head_dim 128
            heads(8, 2, 32, 64, "float32", 9, pos0=60)]          # the last tokens past the capacity


@pytest.mark.parametrize("wl", ATTN_WLS, ids=["gqa2", "gqa8", "mha", "past-capacity"])
def test_prefill_attention_matches_reference_on_cpu(wl):
    for seed, knobs in enumerate(cpu_settings(ATTN)):
        assert run_cpu(ATTN, wl, knobs, seed=seed) < tolerance(ATTN, wl), knobs


def test_prefill_attention_reads_no_row_past_the_prompt():
    """NaN in every cache row after pos0 + n - 1: any read of one (even weighted by 0) would show."""
    wl = ATTN_WLS[1]
    inputs = ATTN.inputs(wl, np.random.default_rng(0))
    for cache in inputs[1:3]:
        cache[:, wl["pos0"] + wl["n"]:] = np.nan
    for knobs in (None, ATTN.default_knobs(wl, CPU)):
        assert run_cpu(ATTN, wl, knobs, inputs) < ATTN.tolerance


def test_prefill_attention_reference_is_causal_decode_attention():
    """Token t gives what decode attention gives for one token at position pos0 + t."""
    wl = ATTN_WLS[0]
    q, k, v, pos, out = inputs = ATTN.inputs(wl, np.random.default_rng(2))
    ref = ATTN.reference(inputs)
    for t in range(wl["n"]):
        one = DECODE_ATTN.reference([q[t:t + 1], k, v, pos + t])
        assert np.allclose(one[0], ref[t], atol=1e-6)


# --- Relax: the prefill step as the compiler will call it ---------------------------------------

def test_relax_prefill_step_updates_cache_in_place():
    """prefill_rope_kv_append through call_tir_inplace (caches as arguments 2 and 3), then
    prefill_attention on its q_out and the updated caches; scheduled CPU functions."""
    from tvm import relax
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op, spec

    wl = heads(8, 2, 32, 32, "float32", 6, theta=10000.0, pos0=3)
    Hq, Hkv, D, C, dt = wl["q_heads"], wl["kv_heads"], wl["head_dim"], wl["capacity"], wl["dtype"]
    rope, attn = (t.schedule(wl, t.default_knobs(wl, CPU), CPU)["main"] for t in (ROPE, ATTN))

    def new(specs):
        return [nn.Tensor.placeholder(list(shape), dtype) for shape, dtype in specs]

    class Step(nn.Module):
        def forward(self, qkv, pos, k_cache, v_cache):
            k, v, q = op.tensor_ir_inplace_op(rope, "rope", [qkv, pos, k_cache, v_cache], [2, 3, -1],
                                              new([((Hkv, C, D), dt)] * 2 + ROPE.output_specs(wl)))
            out = op.tensor_ir_op(attn, "attention", [q, k, v, pos], new(ATTN.output_specs(wl))[0])
            return out, k, v

    cache = spec.Tensor([Hkv, C, D], dt)
    mod, _ = Step().export_tvm(spec={"forward": {"qkv": spec.Tensor([wl["n"], (Hq + 2 * Hkv) * D], dt),
                                                 "pos": spec.Tensor([1], "int32"), "k_cache": cache, "v_cache": cache}})
    vm = relax.VirtualMachine(tvm.compile(mod, target=CPU), tvm.cpu())
    inputs = ROPE.inputs(wl, np.random.default_rng(0))
    args = [tvm.runtime.tensor(a) for a in inputs[:4]]
    out, k, v = vm["forward"](*args)
    k_ref, v_ref, q_ref = ROPE.reference(inputs)
    assert np.abs(args[2].numpy() - k_ref).max() < 1e-5 and (args[3].numpy() == v_ref).all()
    assert (k.numpy() == args[2].numpy()).all()        # the output is the input cache, updated
    assert np.abs(out.numpy() - ATTN.reference([q_ref, k_ref, v_ref, inputs[1]])).max() < 1e-5


# --- GPU code: sm_90 without a GPU ------------------------------------------------------------

# The attention shapes the brief names: Llama-2-7B (32/32 heads), Llama-2-70B on 2 and 4 GPUs.
LLAMA_HEADS = [(32, 32), (32, 4), (16, 2)]
PROMPTS = [8, 32, 128, 256]


def test_default_gpu_knobs_are_valid_for_llama_shapes():
    for (hq, hkv), n in itertools.product(LLAMA_HEADS, PROMPTS):
        for tpl, wl in ((ATTN, heads(hq, hkv, 128, 4096, "float16", n)),
                        (ROPE, heads(hq, hkv, 128, 4096, "float16", n, theta=10000.0))):
            knobs = tpl.default_knobs(wl, SM90)
            tpl.validate_knobs(knobs)
            assert tpl.check(wl, knobs, SM90) is None, (wl, knobs)
    for n, H, quant in itertools.product((1, 7, 512), (4096, 5120, 8192), ("q0f16", "q4f16_1")):
        wl = {"n": n, "vocab": 32000, "H": H, "quant": quant}
        knobs = EMB.default_knobs(wl, SM90)
        EMB.validate_knobs(knobs)
        assert EMB.check(wl, knobs, SM90) is None
    EMB.validate_knobs(EMB.default_knobs({"n": 3, "vocab": 10, "H": 64, "quant": "q0f16"}, CPU))
    for tpl in (ROPE, ATTN):
        tpl.validate_knobs(tpl.default_knobs(ROPE_WLS[0], CPU))


def test_prefill_attention_default_knobs_build_for_llama_shapes():
    """Every distinct default setting of those shapes generates CUDA C (nvcc builds one)."""
    seen = {}
    for (hq, hkv), n in itertools.product(LLAMA_HEADS, PROMPTS):
        wl = heads(hq, hkv, 128, 4096, "float16", n)
        knobs = ATTN.default_knobs(wl, SM90)
        key = (hq // hkv, tuple(sorted(knobs.items())))
        if key not in seen:
            seen[key] = cuda_source(ATTN, wl, knobs)
            assert "__global__" in seen[key] and "uint4" in seen[key]   # 16-byte loads
    nvcc_builds(next(iter(seen.values())))


@pytest.mark.parametrize("tpl,wl", [
    (EMB, {"n": 7, "vocab": 32000, "H": 4096, "quant": "q0f16"}),
    (EMB, {"n": 300, "vocab": 32000, "H": 8192, "quant": "q4f16_1"}),
    (ROPE, heads(32, 4, 128, 4096, "float16", 100, theta=10000.0)),
    (ATTN, heads(16, 2, 128, 4096, "float16", 100)),
], ids=["embedding-q0f16", "embedding-q4f16_1", "rope-70b-tp2", "attention-70b-tp4"])
def test_cuda_candidates_compile(tpl, wl):
    """The default and sampled valid knobs generate CUDA for sm_90; nvcc builds the default."""
    cands = tpl.sample_knobs(wl, SM90, np.random.default_rng(0), 4, first=[tpl.default_knobs(wl, SM90)])
    assert len(cands) == 4
    for i, knobs in enumerate(cands):
        src = cuda_source(tpl, wl, knobs)
        assert "__global__" in src
        if i == 0:
            nvcc_builds(src)


def test_rocm_code_generation():
    try:
        target = target_of(get_arch("gfx1100"))
    except UserError as e:
        pytest.skip(str(e))
    for tpl, wl in ((EMB, {"n": 5, "vocab": 100, "H": 256, "quant": "q4f16_1"}), (ROPE, ROPE_WLS[1]),
                    (ATTN, ATTN_WLS[1])):
        tvm.compile(tpl.schedule(wl, tpl.default_knobs(wl, target), target), target=target)


def test_knob_checks():
    wl = heads(32, 4, 128, 4096, "float16", 128)
    good = {"threads": 128, "tpt": 8, "rows": 1, "key_tile": 32}
    assert ATTN.check(wl, good, SM90) is None
    assert "divide head_dim" in ATTN.check(heads(8, 4, 32, 64, "float16", 4), {**good, "tpt": 8}, SM90)
    assert "registers" in ATTN.check(wl, {**good, "tpt": 2, "rows": 2}, SM90)
    assert "shared memory" in ATTN.check(heads(8, 8, 256, 64, "float16", 4), {**good, "tpt": 16, "key_tile": 64}, SM90)
    assert "16 bytes" in EMB.check({"n": 1, "vocab": 8, "H": 64, "quant": "q0f32"}, {"threads": 64, "vec": 8}, SM90)
    assert "multiple" in EMB.check({"n": 1, "vocab": 8, "H": 48, "quant": "q4f16_1"}, {"parallel": "none"}, CPU)
    ROPE.validate_knobs({"parallel": "tokens"})
    ROPE.validate_knobs({"vec": 8, "heads_per_block": 2})


# --- the GPU kernels' numerics, their CUDA C run on CPU threads -------------------------------

def test_embedding_gpu_kernel_on_cpu_threads(tmp_path):
    wl = {"n": 3, "vocab": 40, "H": 320, "quant": "q4f16_1"}     # a partial chunk of threads
    for knobs in ({"threads": 64, "vec": 4}, {"threads": 128, "vec": 8}):
        (kernel,) = emulate(cuda_source(EMB, wl, knobs), tmp_path).values()
        inputs = EMB.inputs(wl, np.random.default_rng(0))

        def run(n):
            arrays = dict(zip(["ids", "wq", "scale", "out"], inputs))
            arrays["out"][...] = np.nan
            kernel(arrays, wl["n"] * -(-wl["H"] // knobs["vec"] // knobs["threads"]))
            return [arrays["out"]]
        assert EMB.relative_error(inputs, run) < EMB.tolerance, knobs


def test_prefill_rope_gpu_kernel_on_cpu_threads(tmp_path):
    wl = ROPE_WLS[1]                                             # GQA, runs past the capacity
    knobs = ROPE.default_knobs(wl, SM90)
    (kernel,) = emulate(cuda_source(ROPE, wl, knobs), tmp_path).values()
    inputs = ROPE.inputs(wl, np.random.default_rng(0))

    def run(n):
        arrays = dict(zip(["qkv", "pos", "k_cache", "v_cache", "q_out"], [a.copy() for a in inputs]))
        for name in ("k_cache", "v_cache", "q_out"):
            arrays[name][...] = np.nan
        kernel(arrays, -(-(wl["q_heads"] + 2 * wl["kv_heads"]) // knobs["heads_per_block"]), wl["n"])
        return [arrays["k_cache"], arrays["v_cache"], arrays["q_out"]]
    assert ROPE.relative_error(inputs, run) < ROPE.tolerance


@pytest.mark.parametrize("wl,knobs", [
    (ATTN_WLS[1], {"threads": 64, "tpt": 4, "rows": 2, "key_tile": 16}),    # GQA 8, pos0 > 0, 3 blocks
    (heads(4, 2, 32, 48, "float16", 7, pos0=44), None),                    # default knobs, past capacity
    (heads(8, 2, 64, 64, "float32", 6, pos0=20), {"threads": 64, "tpt": 16, "rows": 4, "key_tile": 16}),
    (heads(16, 2, 128, 64, "float16", 20, pos0=30), {"threads": 128, "tpt": 8, "rows": 2, "key_tile": 32}),
], ids=["gqa8-pos0", "default-past-capacity", "fp32-wide-rows", "head128"])
def test_prefill_attention_gpu_kernel_on_cpu_threads(wl, knobs, tmp_path):
    """Rows past the prompt hold NaN: the kernel must neither read nor weight them."""
    knobs = knobs or ATTN.default_knobs(wl, SM90)
    assert ATTN.check(wl, knobs, SM90) is None
    (kernel,) = emulate(cuda_source(ATTN, wl, knobs), tmp_path).values()
    inputs = ATTN.inputs(wl, np.random.default_rng(0))
    for cache in inputs[1:3]:
        cache[:, wl["pos0"] + wl["n"]:] = np.nan
    block_rows = knobs["threads"] // knobs["tpt"] * knobs["rows"]

    def run(n):
        arrays = dict(zip(["q", "k_cache", "v_cache", "pos", "out"], inputs))
        arrays["out"][...] = np.nan
        kernel(arrays, -(-wl["n"] * wl["q_heads"] // wl["kv_heads"] // block_rows), wl["kv_heads"])
        return [arrays["out"]]
    assert ATTN.relative_error(inputs, run) < ATTN.tolerance
