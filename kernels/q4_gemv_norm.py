"""q4f16_1 GEMV with the RMSNorm before it folded in: y = RMSNorm(h) @ W^T, and the gate/up
form y = SiLU(gate) * up of it. One kernel instead of two: on one GPU every QKV and gate/up
projection follows a norm, 64 of a 7B step's 65 norms (1.7 us each on an H100).

    x[b, k] = h[b, k] * rsqrt(mean_k h[b, k]^2 + eps) * g[k]      (fp16, as rms_norm writes it)
    y[b, n] = sum_k x[b, k] * W[n, k]

Each thread block sums h^2 itself, over all its threads, then makes x as the GEMV schedule
loads the activations (into shared memory or registers: x never reaches device memory). That
costs every block 8 KB more read from L2, beside its share of the weights' HBM stream. The
GEMV part, its knobs and its schedules are q4f16_1_gemv's.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from . import register
from .cuda_helpers import register_cuda_helper
from .gemv_schedule import schedule_gemv_cpu, schedule_gemv_gpu
from .q4_gemv import GROUP, Q4Gemv, dequantize
from .template import target_is_gpu

EPS = 1e-5


def q4_norm_compute(B: int, N: int, K: int, epilogue: str, decode: str):
    P = 2 if epilogue == "silu_mul" else 1
    NO = N // P

    @T.prim_func(s_tir=True)
    def q4_gemv_norm(h: T.Buffer((B, K), "float16"), wq: T.Buffer((N, K // 8), "uint32"),
                     scale: T.Buffer((N, K // GROUP), "float16"), g: T.Buffer((K,), "float16"),
                     y: T.Buffer((B, NO), "float16")):
        T.func_attr({"tirx.noalias": True})
        ssq = T.sblock_alloc_buffer((B,), "float32")
        x = T.sblock_alloc_buffer((B, K), "float16")
        acc = T.sblock_alloc_buffer((B, N), "float32")
        for b, k in T.grid(B, K):
            with T.sblock("ssq"):
                vb, vk = T.axis.remap("SR", [b, k])
                with T.init():
                    ssq[vb] = T.float32(0)
                ssq[vb] += T.Cast("float32", h[vb, vk]) * T.Cast("float32", h[vb, vk])
        for b, k in T.grid(B, K):
            with T.sblock("scale_x"):
                vb, vk = T.axis.remap("SS", [b, k])
                x[vb, vk] = T.Cast("float16", T.Cast("float32", h[vb, vk])
                                   * T.rsqrt(ssq[vb] / T.float32(K) + T.float32(EPS)) * T.Cast("float32", g[vk]))
        if decode == "f16x2":
            for b, i, j, k in T.grid(B, NO, P, K // 8):
                with T.sblock("gemv"):
                    vb, vi, vj, vw = T.axis.remap("SSSR", [b, i, j, k])
                    with T.init():
                        acc[vb, vi * P + vj] = T.float32(0)
                    acc[vb, vi * P + vj] += T.call_pure_extern(
                        "float32", "st_q4_dot8", wq[vj * NO + vi, vw],
                        x[vb, vw * 8], x[vb, vw * 8 + 1], x[vb, vw * 8 + 2], x[vb, vw * 8 + 3],
                        x[vb, vw * 8 + 4], x[vb, vw * 8 + 5], x[vb, vw * 8 + 6], x[vb, vw * 8 + 7],
                    ) * T.Cast("float32", scale[vj * NO + vi, vw // 4])
        else:
            w = T.sblock_alloc_buffer((N, K), "float32")
            for n, k in T.grid(N, K):
                with T.sblock("decode"):
                    vn, vk = T.axis.remap("SS", [n, k])
                    w[vn, vk] = (T.reinterpret("float32", (wq[vn, vk // 8] >> T.Cast("uint32", vk % 8 * 4))
                                               & T.uint32(15) | T.uint32(0x4B000000))
                                 - T.float32(8388615.0)) * T.Cast("float32", scale[vn, vk // GROUP])
            for b, i, j, k in T.grid(B, NO, P, K):
                with T.sblock("gemv"):
                    vb, vi, vj, vk = T.axis.remap("SSSR", [b, i, j, k])
                    with T.init():
                        acc[vb, vi * P + vj] = T.float32(0)
                    acc[vb, vi * P + vj] += T.Cast("float32", x[vb, vk]) * w[vj * NO + vi, vk]
        for b, i in T.grid(B, NO):
            with T.sblock("epilogue"):
                vb, vi = T.axis.remap("SS", [b, i])
                if epilogue == "silu_mul":
                    y[vb, vi] = T.Cast("float16", acc[vb, vi * 2] * T.sigmoid(acc[vb, vi * 2]) * acc[vb, vi * 2 + 1])
                else:
                    y[vb, vi] = T.Cast("float16", acc[vb, vi])
    return q4_gemv_norm


# Vectorized by 8, the scaling broadcasts rstd to 8 floats, which TVM's CUDA codegen writes as
# make_ulonglong4 of 8 floats (its storage for float x 8): no such function exists, so define it.
register_cuda_helper("make_ulonglong4", r"""
__device__ __forceinline__ ulonglong4 make_ulonglong4(float a, float b, float c, float d,
                                                      float e, float f, float g, float h) {
  ulonglong4 r;
  float2* lanes = reinterpret_cast<float2*>(&r);
  lanes[0] = make_float2(a, b); lanes[1] = make_float2(c, d);
  lanes[2] = make_float2(e, f); lanes[3] = make_float2(g, h);
  return r;
}
""")


@register
class Q4GemvNorm(Q4Gemv):
    name = "q4f16_1_gemv_norm"
    #: the tuner starts from the records of the same shape without the norm
    warm_start_from = "q4f16_1_gemv"

    def compute(self, wl, decode: str = "f32"):
        return q4_norm_compute(wl["batch"], wl["N"], wl["K"], self.epilogue, decode)

    def schedule(self, wl, knobs, target):
        decode = knobs.get("decode", "f32") if target_is_gpu(target) else "f32"
        sch = s_tir.Schedule(tvm.IRModule({"main": self.compute(wl, decode)}))
        if decode == "f32":
            sch.compute_inline(sch.get_sblock("decode"))
        if target_is_gpu(target):
            schedule_gemv_gpu(sch, "wq", per_step=8 if decode == "f32" else 1,
                              **{k: v for k, v in knobs.items() if k != "decode"})
            # the norm's output straight into the GEMV's shared or register copy of the activations
            sch.compute_inline(sch.get_sblock("scale_x"))
            # the sum of squares: once per block, over all its threads, before the rows
            ssq = sch.get_sblock("ssq")
            bx = sch.get_loops(sch.get_sblock("epilogue"))[0]
            sch.compute_at(ssq, bx)
            *batch, k = sch.get_loops(ssq)[1:]
            ko, ty, tx = sch.split(k, [None, knobs["rows"], knobs["tx"]])
            sch.reorder(*batch, ty, tx, ko)   # the reduction's loops innermost, as TVM requires
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            sch.set_scope(ssq, 0, "local")   # the block-wide sum lands in every thread
        else:
            sch.compute_inline(sch.get_sblock("scale_x"))
            schedule_gemv_cpu(sch, **knobs)
        return sch.mod

    def inputs(self, wl, rng):
        B, K = wl["batch"], wl["K"]
        _, wq, scale, y = super().inputs(wl, rng)
        # a residual stream's size, so the division matters
        h = (rng.standard_normal((B, K)) * 4).astype(np.float16)
        g = (1 + 0.1 * rng.standard_normal(K)).astype(np.float16)
        return [h, wq, scale, g, y]

    def reference(self, inputs):
        h, wq, scale, g = inputs[:4]
        hf = h.astype(np.float32)
        x = (hf / np.sqrt(np.mean(hf * hf, axis=1, keepdims=True) + EPS) * g.astype(np.float32)).astype(np.float16)
        acc = x.astype(np.float32) @ dequantize(wq, scale).T
        if self.epilogue == "silu_mul":
            gate, up = np.split(acc, 2, axis=1)
            return (gate / (1 + np.exp(-gate)) * up).astype(np.float16)
        return acc.astype(np.float16)

    def bytes_moved(self, wl):
        return super().bytes_moved(wl) + wl["K"] * 2


@register
class Q4GemvSiluMulNorm(Q4GemvNorm):
    name = "q4f16_1_gemv_silu_mul_norm"
    epilogue = "silu_mul"
    warm_start_from = "q4f16_1_gemv_silu_mul"
