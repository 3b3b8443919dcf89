"""q4f16_1 GEMV: y[b, n] = sum_k x[b, k] * (q[n, k] - 7) * scale[n, k // 32].

Weights are 4-bit values packed 8 to a uint32 along K (nibble i of word j holds
element 8*j + i), one fp16 scale per group of 32 along K, as in MLC-LLM's q4f16_1.
Decoding and accumulation are fp32; batch 1..4 (decode). The decode block is separate so that
TVM's dlight GEMV rule recognises the function (the baseline every record must beat).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from . import register
from .template import Template, target_is_gpu

GROUP = 32


def pack_q4(q: np.ndarray) -> np.ndarray:
    """(N, K) integers 0..15 -> (N, K // 8) uint32, nibble i of word j = element 8j + i."""
    n, k = q.shape
    q = q.astype(np.uint32).reshape(n, k // 8, 8)
    return np.bitwise_or.reduce(q << (4 * np.arange(8, dtype=np.uint32)), axis=2).astype(np.uint32)


def unpack_q4(wq: np.ndarray) -> np.ndarray:
    n, w = wq.shape
    return ((wq[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).reshape(n, w * 8)


def dequantize(wq: np.ndarray, scale: np.ndarray) -> np.ndarray:
    q = unpack_q4(wq).astype(np.float32) - 7
    return q * np.repeat(scale.astype(np.float32), GROUP, axis=1)


@register
class Q4Gemv(Template):
    name = "q4f16_1_gemv"
    gpu_knobs = {
        "rows": [1, 2, 4, 8, 16],          # output rows per thread block (threadIdx.y)
        "tx": [4, 8, 16, 32, 64, 128],     # threads sharing one row's K (threadIdx.x)
        "vec": [1, 2, 4],                  # uint32 words per weight load (4 = 16-byte loads)
        "unroll": [1, 2, 4, 8],            # weight loads per thread per step, kept in flight
        "x_scope": ["shared", "global"],   # where the activation vector is read from
        "decode": ["f32", "f16x2"],        # per-weight fp32 math, or two weights per half2 op (CUDA)
    }
    cpu_knobs = {
        "rows": [1, 4, 16, 64],            # output rows per parallel task
        "lanes": [8, 16, 32],              # partial sums kept in SIMD registers
        "unroll": [1, 2, 4],               # K steps of `lanes` unrolled
    }

    def compute(self, wl):
        B, N, K = wl["batch"], wl["N"], wl["K"]

        @T.prim_func(s_tir=True)
        def q4_gemv(x: T.Buffer((B, K), "float16"), wq: T.Buffer((N, K // 8), "uint32"),
                    scale: T.Buffer((N, K // GROUP), "float16"), y: T.Buffer((B, N), "float16")):
            T.func_attr({"tirx.noalias": True})
            w = T.sblock_alloc_buffer((N, K), "float32")
            acc = T.sblock_alloc_buffer((B, N), "float32")
            for n, k in T.grid(N, K):
                with T.sblock("decode"):
                    vn, vk = T.axis.remap("SS", [n, k])
                    # The nibble becomes the mantissa of 2**23: an exact int->float without
                    # the quarter-rate conversion instruction.
                    w[vn, vk] = (T.reinterpret("float32", (wq[vn, vk // 8] >> T.Cast("uint32", vk % 8 * 4))
                                               & T.uint32(15) | T.uint32(0x4B000000))
                                 - T.float32(8388615.0)) * T.Cast("float32", scale[vn, vk // GROUP])
            for b, n, k in T.grid(B, N, K):
                with T.sblock("gemv"):
                    vb, vn, vk = T.axis.remap("SSR", [b, n, k])
                    with T.init():
                        acc[vb, vn] = T.float32(0)
                    acc[vb, vn] += T.Cast("float32", x[vb, vk]) * w[vn, vk]
            for b, n in T.grid(B, N):
                with T.sblock("epilogue"):
                    vb, vn = T.axis.remap("SS", [b, n])
                    y[vb, vn] = T.Cast("float16", acc[vb, vn])

        return q4_gemv

    def compute_f16x2(self, wl):
        """The same function, reduced a word (8 weights) at a time by `st_q4_dot8`, which
        decodes and multiplies two weights per half2 instruction (CUDA only, see below)."""
        B, N, K = wl["batch"], wl["N"], wl["K"]

        @T.prim_func(s_tir=True)
        def q4_gemv_f16x2(x: T.Buffer((B, K), "float16"), wq: T.Buffer((N, K // 8), "uint32"),
                          scale: T.Buffer((N, K // GROUP), "float16"), y: T.Buffer((B, N), "float16")):
            T.func_attr({"tirx.noalias": True})
            acc = T.sblock_alloc_buffer((B, N), "float32")
            for b, n, k in T.grid(B, N, K // 8):
                with T.sblock("gemv"):
                    vb, vn, vw = T.axis.remap("SSR", [b, n, k])
                    with T.init():
                        acc[vb, vn] = T.float32(0)
                    acc[vb, vn] += T.call_pure_extern(
                        "float32", "st_q4_dot8", wq[vn, vw],
                        x[vb, vw * 8], x[vb, vw * 8 + 1], x[vb, vw * 8 + 2], x[vb, vw * 8 + 3],
                        x[vb, vw * 8 + 4], x[vb, vw * 8 + 5], x[vb, vw * 8 + 6], x[vb, vw * 8 + 7],
                    ) * T.Cast("float32", scale[vn, vw // 4])
            for b, n in T.grid(B, N):
                with T.sblock("epilogue"):
                    vb, vn = T.axis.remap("SS", [b, n])
                    y[vb, vn] = T.Cast("float16", acc[vb, vn])

        return q4_gemv_f16x2

    def check(self, wl, knobs, target):
        if not target_is_gpu(target):
            if wl["N"] % knobs["rows"] or wl["K"] % (knobs["lanes"] * knobs["unroll"]):
                return "rows must divide N and lanes * unroll must divide K"
            return None
        if knobs["decode"] == "f16x2" and target.kind.name != "cuda":
            return "f16x2 decode is CUDA C"
        words = wl["K"] // 8
        threads = knobs["rows"] * knobs["tx"]
        if not 32 <= threads <= 1024:
            return f"{threads} threads per block"
        if wl["N"] % knobs["rows"]:
            return "rows must divide N"
        if words % (knobs["tx"] * knobs["vec"] * knobs["unroll"]):
            return "tx * vec * unroll must divide K / 8"
        if knobs["x_scope"] == "shared" and wl["batch"] * wl["K"] * 2 > 48 * 1024:
            return "activation does not fit 48 KB of shared memory"
        return None

    def default_knobs(self, wl, target):
        if not target_is_gpu(target):
            return {"rows": 4, "lanes": 16, "unroll": 1}
        for tx in (32, 16, 8, 4):   # the widest row that divides K with 16-byte loads
            knobs = {"rows": 4, "tx": tx, "vec": 4, "unroll": 1, "x_scope": "global", "decode": "f32"}
            if self.check(wl, knobs, target) is None:
                return knobs
        return {"rows": 4, "tx": 32, "vec": 1, "unroll": 1, "x_scope": "global", "decode": "f32"}

    def schedule(self, wl, knobs, target):
        if target_is_gpu(target) and knobs["decode"] == "f16x2":
            sch = s_tir.Schedule(tvm.IRModule({"main": self.compute_f16x2(wl)}))
            _schedule_gpu(sch, per_step=1, **knobs)
            return sch.mod
        sch = s_tir.Schedule(tvm.IRModule({"main": self.compute(wl)}))
        sch.compute_inline(sch.get_sblock("decode"))
        if target_is_gpu(target):
            _schedule_gpu(sch, per_step=8, **knobs)
        else:
            _schedule_cpu(sch, **knobs)
        return sch.mod

    def inputs(self, wl, rng):
        B, N, K = wl["batch"], wl["N"], wl["K"]
        x = rng.standard_normal((B, K)).astype(np.float16)
        wq = pack_q4(rng.integers(0, 16, (N, K)))
        # scales sized so outputs stay O(1) in fp16
        scale = (rng.random((N, K // GROUP)) * 0.02 + 0.005).astype(np.float16)
        return [x, wq, scale, np.zeros((B, N), np.float16)]

    def reference(self, inputs):
        x, wq, scale = inputs[:3]
        return (x.astype(np.float32) @ dequantize(wq, scale).T).astype(np.float16)

    def bytes_moved(self, wl):
        B, N, K = wl["batch"], wl["N"], wl["K"]
        return N * K // 2 + N * (K // GROUP) * 2 + B * K * 2 + B * N * 2


def _schedule_gpu(sch, rows, tx, vec, unroll, x_scope, decode, per_step):
    """`per_step`: reduction steps per packed word (8 weights, or 1 for st_q4_dot8)."""
    gemv = sch.get_sblock("gemv")
    b, n, k = sch.get_loops(gemv)
    bx, ty = sch.split(n, [None, rows])
    # A warp's threads read neighbouring vec-word chunks of a row: coalesced loads.
    ko, ku, tx_, ke = sch.split(k, [None, unroll, tx, vec * per_step])
    sch.reorder(bx, ty, tx_, ko, ku, ke, b)  # b innermost: each decoded weight serves every batch row
    rf = sch.rfactor(tx_, factor_axis=0)     # per-thread partial sums
    bx, ty, tx_, ko, ku, ke, b = sch.get_loops(rf)
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx_, "threadIdx.x")
    sch.unroll(ku)
    sch.unroll(ke)
    sch.unroll(b)   # batch rows index registers: only constant indices keep them out of local memory
    sch.set_scope(rf, 0, "local")

    names = [r.source.name for r in sch.get(rf).reads]
    wl = sch.cache_read(rf, names.index("wq"), "local")   # vec words per load, into registers
    sch.compute_at(wl, ku)
    if vec > 1:  # at vec=1 the copy has no loop of its own to vectorize
        sch.vectorize(sch.get_loops(wl)[-1])
    if x_scope == "shared":
        xs = sch.cache_read(rf, names.index("x"), "shared")
        sch.compute_at(xs, bx)
        fused = sch.fuse(*sch.get_loops(xs)[1:])
        _, lty, ltx, lv = sch.split(fused, [None, rows, tx, 8])
        sch.bind(lty, "threadIdx.y")
        sch.bind(ltx, "threadIdx.x")
        sch.vectorize(lv)
    xl = sch.cache_read(rf, names.index("x"), "local")     # this step's activations, 16-byte loads
    sch.compute_at(xl, ku)
    sch.vectorize(sch.split(sch.get_loops(xl)[-1], [None, 8])[1])

    sch.reverse_compute_at(gemv, ty)          # cross-thread sum over tx (warp shuffles)
    inner = sch.get_loops(gemv)[2:]           # (tx, b), or (tx,) where b has extent 1
    if len(inner) == 2:
        sch.reorder(inner[1], inner[0])
    sch.bind(inner[0], "threadIdx.x")
    sch.set_scope(gemv, 0, "local")
    sch.reverse_compute_at(sch.get_sblock("epilogue"), ty)
    sch.decompose_reduction(rf, ko)


def _schedule_cpu(sch, rows, lanes, unroll):
    gemv = sch.get_sblock("gemv")
    b, n, k = sch.get_loops(gemv)
    no, ni = sch.split(n, [None, rows])
    ko, ku, kv = sch.split(k, [None, unroll, lanes])
    sch.reorder(no, ni, b, ko, ku, kv)
    # `lanes` independent partial sums: a SIMD vector instead of one dependent FMA chain.
    rf = sch.rfactor(kv, factor_axis=0)
    no, ni, b, ko, ku, kv = sch.get_loops(rf)
    sch.parallel(no)
    sch.unroll(ku)
    sch.vectorize(kv)
    sch.decompose_reduction(rf, ko)
    sch.reverse_compute_at(gemv, ni)
    sch.reverse_compute_at(sch.get_sblock("epilogue"), ni)


# st_q4_dot8(w, x0..x7) = sum_i x_i * (nibble_i(w) - 7), two weights per half2 instruction:
# (w >> 4i) & 0x000F000F | 0x64006400 holds nibbles i and i+4 as the halves 1024 + q.
ST_Q4_DOT8_CUDA = r"""
__device__ __forceinline__ float st_q4_dot8(unsigned int w, half x0, half x1, half x2, half x3,
                                            half x4, half x5, half x6, half x7) {
  const half2 bias = __half2half2(__ushort_as_half((unsigned short)0x6407));  // 1031 = 1024 + 7
  const half xs[8] = {x0, x1, x2, x3, x4, x5, x6, x7};
  half2 acc = __float2half2_rn(0.0f);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    unsigned int bits = ((w >> (4 * i)) & 0x000F000Fu) | 0x64006400u;
    half2 q = __hsub2(*reinterpret_cast<half2*>(&bits), bias);
    acc = __hfma2(__halves2half2(xs[i], xs[i + 4]), q, acc);
  }
  return __low2float(acc) + __high2float(acc);
}
"""


@tvm.register_global_func("tvm_callback_cuda_postproc", override=True)
def _add_cuda_helpers(code, target=None):
    """TVM hands generated CUDA C here before compiling it: define the helpers it calls."""
    if "st_q4_dot8(" in code and "float st_q4_dot8" not in code:
        at = code.find('extern "C" __global__')
        code = code[:at] + ST_Q4_DOT8_CUDA + code[at:]
    return code
