"""q4f16_1 GEMM for prefill: y[m, n] = sum_k x[m, k] * w[n, k], w = (q - 7) * scale rounded to fp16.

A prompt of M tokens (a prefill bucket: 1..512) through one linear layer. The weights are
q4f16_1 as in q4_gemv.py. They are dequantized on the way into shared memory, never written
back as fp16, and multiplied on tensor cores (wmma 16x16x16, fp32 accumulation) at every M.
The baseline is dlight's Matmul rule on the same compute, which runs CUDA cores up to 64 rows.

GPU schedule (CUDA, sm_80+): a block owns a (16 warps_m tiles_m) x (16 warps_n tiles_n) tile of
y; each warp owns tiles_m x tiles_n 16x16 accumulators. Per step of 16 k_tiles along K, the
block copies its rows of x and decodes its rows of w into shared memory; with `pipeline` P the
next P steps' copies are in flight meanwhile (cp.async, `_pipeline`). M is padded up to the
block's rows (a bucket need not be a multiple of 16); N and K must divide. Elsewhere (ROCm)
builds take dlight's Matmul on this compute, the decode inlined into its loads.
"""
from __future__ import annotations

import itertools

import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from . import register
from .q4_gemv import GROUP, dequantize, random_q4
from .template import Template, target_is_gpu

# Shared memory a block may use: static at most 48 KB (the output tile), and all of it at most what
# sm_86 and sm_89 allow with the opt-in TVM's runtime makes for dynamic shared memory (99 KB).
STATIC_BYTES, SHARED_BYTES = 48 * 1024, 96 * 1024


def q4_gemm_compute(M: int, N: int, K: int):
    @T.prim_func(s_tir=True)
    def q4_gemm(x: T.Buffer((M, K), "float16"), wq: T.Buffer((N, K // 8), "uint32"),
                scale: T.Buffer((N, K // GROUP), "float16"), y: T.Buffer((M, N), "float16")):
        T.func_attr({"tirx.noalias": True})
        w = T.sblock_alloc_buffer((N, K), "float16")
        acc = T.sblock_alloc_buffer((M, N), "float32")
        for n, k in T.grid(N, K):
            with T.sblock("decode"):
                vn, vk = T.axis.remap("SS", [n, k])
                w[vn, vk] = T.Cast("float16", (T.Cast("float32", (wq[vn, vk // 8] >> T.Cast("uint32", vk % 8 * 4))
                                                      & T.uint32(15)) - T.float32(7))
                                   * T.Cast("float32", scale[vn, vk // GROUP]))
        for m, n, k in T.grid(M, N, K):
            with T.sblock("matmul"):
                vm, vn, vk = T.axis.remap("SSR", [m, n, k])
                with T.init():
                    acc[vm, vn] = T.float32(0)
                acc[vm, vn] += T.Cast("float32", x[vm, vk]) * T.Cast("float32", w[vn, vk])
        for m, n in T.grid(M, N):
            with T.sblock("cast"):
                vm, vn = T.axis.remap("SS", [m, n])
                y[vm, vn] = T.Cast("float16", acc[vm, vn])

    return q4_gemm


def _tile(knobs) -> tuple[int, int, int]:
    return 16 * knobs["warps_m"] * knobs["tiles_m"], 16 * knobs["warps_n"] * knobs["tiles_n"], 16 * knobs["k_tiles"]


def _spread(sch: s_tir.Schedule, stage, warps: int, vec: int) -> None:
    """A shared stage's copy over the block: its two loops fused, `vec` elements a thread at a time."""
    _, ty, tx, v = sch.split(sch.fuse(*sch.get_loops(stage)[-2:]), [None, warps, 32, vec])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(v)


def schedule_wmma(sch: s_tir.Schedule, warps_m: int, warps_n: int, tiles_m: int, tiles_n: int, k_tiles: int,
                  pipeline: int) -> None:
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    bm, bn, bk = _tile(locals())
    mm = sch.get_sblock("matmul")
    padded = int(sch.get(mm).iter_vars[0].dom.extent) % bm != 0
    sch.pad_einsum(mm, [bm, bn, bk])   # M up to the block's rows (x_pad); N and K divide (check)
    m, n, k = sch.get_loops(mm)
    m, mi = sch.split(m, [None, 16])
    n, ni = sch.split(n, [None, 16])
    k, ki = sch.split(k, [None, 16])
    sch.reorder(m, n, k, mi, ni, ki)
    tile = sch.blockize(mi)                       # one 16x16x16 wmma
    mb, mw, mt = sch.split(m, [None, warps_m, tiles_m])
    nb, nw, nt = sch.split(n, [None, warps_n, tiles_n])
    ko, kt = sch.split(k, [None, k_tiles])
    sch.reorder(nb, mb, mw, nw, ko, kt, mt, nt)
    # The row blocks of one column tile launch together, so all but the first read its weights from L2.
    sch.bind(mb, "blockIdx.x")
    sch.bind(nb, "blockIdx.y")
    warp = sch.fuse(mw, nw)
    sch.bind(warp, "threadIdx.y")

    # x, then w: a block's step into shared memory, 4 halves a thread at a time (8 would make
    # TVM's CUDA for the decode use 8-lane float vectors)
    stages = []
    for operand in (0, 1):
        stage = sch.cache_read(tile, operand, "shared.dyn")
        stages.append(stage)
        sch.compute_at(stage, ko)
        _spread(sch, stage, warps_m * warps_n, 4)
        sch.storage_align(stage, 0, axis=-2, factor=16, offset=8)   # rows 16 bytes apart: no bank conflicts
    # The decode (and M's zero padding) happens in the shared stages' loads.
    for name in ("decode", "x_pad") if padded else ("decode",):
        sch.compute_inline(sch.get_sblock(name))
    if pipeline:
        _pipeline(sch, ko, *stages, warps_m * warps_n, pipeline)

    frag_a = sch.cache_read(tile, 0, "wmma.matrix_a")
    frag_b = sch.cache_read(tile, 1, "wmma.matrix_b")
    sch.compute_at(frag_a, kt)
    sch.compute_at(frag_b, kt)
    # The accumulators go out through static shared memory: in the dynamic buffer, TVM's merge of
    # fp32 with the fp16 stages fails to lower (tvm_access_ptr element type).
    out_shared = sch.cache_write(tile, 0, "shared")
    sch.storage_align(out_shared, 0, axis=-2, factor=16, offset=4)
    out_frag = sch.cache_write(tile, 0, "wmma.accumulator")
    sch.reverse_compute_at(out_frag, warp)
    sch.reverse_compute_at(out_shared, warp)
    init = sch.get_child_blocks(sch.decompose_reduction(tile, ko))[0]

    wmma = get_wmma_intrin_group(load_scope="shared.dyn", store_scope="shared", in_dtype="float16",
                                 out_dtype="float32", trans_b=True)
    for frag, intrin in ((frag_a, "load_a"), (frag_b, "load_b"), (out_frag, "store")):
        i, j = sch.get_loops(frag)[-2:]
        i0, i1 = sch.split(i, [None, 16])
        j0, j1 = sch.split(j, [None, 16])
        sch.reorder(i0, j0, i1, j1)
        sch.tensorize(i1, wmma[intrin])
    sch.tensorize(sch.get_loops(init)[-2], wmma["init"])
    sch.tensorize(sch.get_loops(mm)[-3], wmma["compute"])   # mm: the 16x16x16 block inside `tile`

    # y = fp16(acc): the cast (and the drop of M's padding) in the shared -> global copy
    while sch.get_consumers(out_shared):
        sch.reverse_compute_inline(sch.get_consumers(out_shared)[0])
    flat = sch.fuse(*sch.get_loops(out_shared)[-2:])
    _, tx, v = sch.split(flat, [None, 32, 4])
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(v)


def _pipeline(sch: s_tir.Schedule, ko, x_stage, w_stage, warps: int, depth: int) -> None:
    """Steps t + 1 .. t + depth's copies in flight while step t decodes and multiplies: the raw weight
    words and scales get a shared stage of their own (the decode then reads them from there), and
    TVM's software pipeline makes the copies of x, words and scales `cp.async` (PASS_CONFIG), into
    depth + 1 buffers each. (Through registers instead, nvcc moved the loads down to their stores,
    after the mma.) Each decode step then waits at a barrier: TVM sees one merged shared buffer."""
    for operand, vec in ((0, 1), (1, 2)):       # words one at a time, scales two (cp.async moves 4+ bytes)
        raw = sch.cache_read(w_stage, operand, "shared.dyn")
        sch.compute_at(raw, ko)
        _spread(sch, raw, warps, vec)   # rows x (K step / 8 words, or / 32 scales: 2 at least)
    # ko's body: the copies of x, words and scales (stage 0, async), the decode, the mma loop
    sch.annotate(ko, "software_pipeline_stage", [0, 0, 0, depth, depth])
    sch.annotate(ko, "software_pipeline_order", [0, 1, 2, 3, 4])
    sch.annotate(ko, "software_pipeline_async_stages", [0])


@register
class Q4Gemm(Template):
    name = "q4f16_1_gemm"
    gpu_knobs = {
        "warps_m": [1, 2, 4],      # warps of a block along M
        "warps_n": [1, 2, 4, 8],   # and along N
        "tiles_m": [1, 2, 4],      # 16x16 accumulators a warp holds along M
        "tiles_n": [1, 2, 4],      # and along N
        "k_tiles": [1, 2, 4, 8],   # 16-wide K slices a block stages in shared memory at once
        "pipeline": [0, 1, 2],     # K steps whose loads are in flight during this step's math
    }
    cpu_knobs = {"n_tile": [8, 32]}   # output columns a CPU task computes

    def output_specs(self, wl):
        return [((wl["M"], wl["N"]), "float16")]

    def compute(self, wl):
        return q4_gemm_compute(wl["M"], wl["N"], wl["K"])

    def dlight_schedule(self, wl, target, fallback: bool = True):
        """dlight's Matmul: CUDA cores up to 64 rows, its own tensor-core rule above."""
        from tvm.s_tir import dlight as dl

        with target:
            return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.Fallback())(
                tvm.IRModule({"main": self.compute(wl)}))

    def untuned_uses_dlight(self, target) -> bool:
        return target.kind.name != "cuda"   # NVIDIA: the tensor-core default beats CUDA cores

    def check(self, wl, knobs, target):
        M, N, K = wl["M"], wl["N"], wl["K"]
        if not target_is_gpu(target):
            return None if N % knobs["n_tile"] == 0 else f"n_tile {knobs['n_tile']} does not divide N {N}"
        if target.kind.name != "cuda":
            return "the tensor-core schedule is CUDA's (wmma)"
        bm, bn, bk = _tile(knobs)
        if N % bn or K % bk:
            return f"block tile {bn} x {bk} does not divide N x K {N} x {K}"
        if bm > 16 * -(-M // 16):
            return f"block rows {bm} exceed the {M} rows padded to 16"
        threads = 32 * knobs["warps_m"] * knobs["warps_n"]
        if threads > 1024:
            return f"{threads} threads"
        if knobs["pipeline"] and knobs["k_tiles"] < 4:
            return "pipeline copies two scales a row at least: k_tiles 4 or 8"
        staged = (bm + bn) * (bk + 8) * 2                        # x and the decoded w
        if knobs["pipeline"]:                     # more copies of x, and the words and scales
            copies = knobs["pipeline"] + 1
            staged += (copies - 1) * bm * (bk + 8) * 2 + copies * (bn * bk // 8 * 4 + bn * bk // GROUP * 2)
        out = bm * (bn + 4) * 4                                   # the output tile, static
        if out > STATIC_BYTES or staged + out > SHARED_BYTES:
            return f"needs more than {SHARED_BYTES} bytes of shared memory ({STATIC_BYTES} static)"
        return None

    def default_knobs(self, wl, target):
        if not target_is_gpu(target):
            return {"n_tile": 32 if wl["N"] % 32 == 0 else 8}
        # 64-wide K steps and 64 columns a block; up to 64 rows a block (8 warps above 64 rows),
        # so a 16-row prompt still spreads N / 64 blocks over the SMs. Then whatever fits.
        M = wl["M"]
        tiles_m = max(t for t in (1, 2, 4) if t <= -(-M // 16)) if M <= 64 else 2
        first = dict(warps_m=2 if M > 64 else 1, warps_n=4, tiles_m=tiles_m, tiles_n=1, k_tiles=4)
        space = [dict(zip(self.gpu_knobs, v)) for v in itertools.product(*self.gpu_knobs.values())]
        space.sort(key=lambda k: (-k["pipeline"], -k["k_tiles"], -min(_tile(k)[0], M) * _tile(k)[1]))
        for knobs in [*({**first, "pipeline": p} for p in (2, 1, 0)), *space]:
            if self.check(wl, knobs, target) is None:
                return knobs
        raise ValueError(f"no tensor-core tiling fits {wl}")

    def schedule(self, wl, knobs, target):
        sch = s_tir.Schedule(tvm.IRModule({"main": self.compute(wl)}))
        if target_is_gpu(target):
            schedule_wmma(sch, **knobs)
            return sch.mod
        # CPU: a task per n_tile columns decodes its rows of w once, then multiplies every row of x
        mm = sch.get_sblock("matmul")
        sch.transform_layout(mm, ("read", 1), lambda n, k: (k, n))   # w [K, N]: the inner loop runs along N
        m, n, k = sch.get_loops(mm)
        no, ni = sch.split(n, [None, knobs["n_tile"]])
        sch.reorder(no, m, k, ni)
        sch.parallel(no)
        sch.compute_at(sch.get_sblock("decode"), no)
        sch.vectorize(ni)
        sch.reverse_compute_at(sch.get_sblock("cast"), no)
        return sch.mod

    def inputs(self, wl, rng):
        M, N, K = wl["M"], wl["N"], wl["K"]
        x = rng.standard_normal((M, K)).astype(np.float16)
        wq, scale = random_q4(rng, N, K)
        return [x, wq, scale, np.zeros((M, N), np.float16)]

    def reference(self, inputs):
        x, wq, scale = inputs[:3]
        w = dequantize(wq, scale).astype(np.float16).astype(np.float32)   # fp16 weights, as the kernel
        return (x.astype(np.float32) @ w.T).astype(np.float16)

    def bytes_moved(self, wl):
        M, N, K = wl["M"], wl["N"], wl["K"]
        return N * K // 2 + N * (K // GROUP) * 2 + M * K * 2 + M * N * 2
