"""q4f16_1 GEMV: y[b, n] = sum_k x[b, k] * (q[n, k] - 7) * scale[n, k // 32].

Weights are 4-bit values packed 8 to a uint32 along K (nibble i of word j holds
element 8*j + i), one fp16 scale per group of 32 along K, as in MLC-LLM's q4f16_1.
Batch 1..4 (decode), fp32 accumulation. Two decodes: `f32` keeps a separate decode
block, the form TVM's dlight GEMV rule recognises (the baseline every record must
beat); `f16x2` reduces a word at a time with a CUDA helper (below). The fused variants
(residual add, SiLU(gate) * up) subclass this template and change only the epilogue.
"""
from __future__ import annotations


import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from . import register
from .gemv_schedule import (CPU_DEFAULT, CPU_KNOBS, K_LOOPS, check_cpu, check_gpu, default_gpu_knobs,
                            schedule_gemv_cpu, schedule_gemv_gpu)
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


def random_q4(rng: np.random.Generator, N: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Random packed weights and scales, the scales sized so that a product with unit x stays O(1)."""
    wq = pack_q4(rng.integers(0, 16, (N, K)))
    return wq, (rng.random((N, K // GROUP)) * 0.02 + 0.005).astype(np.float16)


def dequantize(wq: np.ndarray, scale: np.ndarray) -> np.ndarray:
    q = unpack_q4(wq).astype(np.float32) - 7
    return q * np.repeat(scale.astype(np.float32), GROUP, axis=1)


def q4_compute(B: int, N: int, K: int, epilogue: str, decode: str):
    """The PrimFunc. N counts weight rows; with epilogue "silu_mul" rows [0, N/2) are the
    gate and [N/2, N) the up projection, and the output has N/2 columns."""
    P = 2 if epilogue == "silu_mul" else 1     # weight rows one output needs (one thread owns them)
    NO = N // P

    @T.macro
    def reduce(x, wq, scale, acc):
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
                    # The nibble becomes the mantissa of 2**23: an exact int->float without
                    # the quarter-rate conversion instruction.
                    w[vn, vk] = (T.reinterpret("float32", (wq[vn, vk // 8] >> T.Cast("uint32", vk % 8 * 4))
                                               & T.uint32(15) | T.uint32(0x4B000000))
                                 - T.float32(8388615.0)) * T.Cast("float32", scale[vn, vk // GROUP])
            for b, i, j, k in T.grid(B, NO, P, K):
                with T.sblock("gemv"):
                    vb, vi, vj, vk = T.axis.remap("SSSR", [b, i, j, k])
                    with T.init():
                        acc[vb, vi * P + vj] = T.float32(0)
                    acc[vb, vi * P + vj] += T.Cast("float32", x[vb, vk]) * w[vj * NO + vi, vk]

    if epilogue == "residual":
        @T.prim_func(s_tir=True)
        def q4_gemv(x: T.Buffer((B, K), "float16"), wq: T.Buffer((N, K // 8), "uint32"),
                    scale: T.Buffer((N, K // GROUP), "float16"), residual: T.Buffer((B, NO), "float16"),
                    y: T.Buffer((B, NO), "float16")):
            T.func_attr({"tirx.noalias": True})
            acc = T.sblock_alloc_buffer((B, N), "float32")
            reduce(x, wq, scale, acc)
            for b, i in T.grid(B, NO):
                with T.sblock("epilogue"):
                    vb, vi = T.axis.remap("SS", [b, i])
                    y[vb, vi] = T.Cast("float16", acc[vb, vi]) + residual[vb, vi]
    else:
        @T.prim_func(s_tir=True)
        def q4_gemv(x: T.Buffer((B, K), "float16"), wq: T.Buffer((N, K // 8), "uint32"),
                    scale: T.Buffer((N, K // GROUP), "float16"), y: T.Buffer((B, NO), "float16")):
            T.func_attr({"tirx.noalias": True})
            acc = T.sblock_alloc_buffer((B, N), "float32")
            reduce(x, wq, scale, acc)
            for b, i in T.grid(B, NO):
                with T.sblock("epilogue"):
                    vb, vi = T.axis.remap("SS", [b, i])
                    if epilogue == "silu_mul":
                        y[vb, vi] = T.Cast("float16", acc[vb, vi * 2] * T.sigmoid(acc[vb, vi * 2]) * acc[vb, vi * 2 + 1])
                    else:
                        y[vb, vi] = T.Cast("float16", acc[vb, vi])
    return q4_gemv


@register
class Q4Gemv(Template):
    name = "q4f16_1_gemv"
    epilogue = "none"
    gpu_knobs = {
        "rows": [1, 2, 4, 8, 16],          # output rows per thread block (threadIdx.y)
        "tx": [4, 8, 16, 32, 64, 128],     # threads sharing one row's K (threadIdx.x)
        "vec": [1, 2, 4],                  # uint32 words per weight load (4 = 16-byte loads)
        "unroll": [1, 2, 4, 8],            # weight loads per thread per step, kept in flight
        "x_scope": ["shared", "global"],   # where the activation vector is read from
        "decode": ["f32", "f16x2"],        # per-weight fp32 math, or two weights per half2 op (CUDA)
        "k_loop": K_LOOPS,                 # K steps in a loop, or unrolled: all loads issued at once
    }
    cpu_knobs = CPU_KNOBS

    def outputs(self, wl) -> int:
        return wl["N"] // 2 if self.epilogue == "silu_mul" else wl["N"]

    def output_specs(self, wl):
        return [((wl["batch"], self.outputs(wl)), "float16")]

    def compute(self, wl, decode: str = "f32"):
        return q4_compute(wl["batch"], wl["N"], wl["K"], self.epilogue, decode)

    def check(self, wl, knobs, target):
        if not target_is_gpu(target):
            return check_cpu(knobs, self.outputs(wl), wl["K"])
        if knobs["decode"] == "f16x2" and target.kind.name != "cuda":
            return "f16x2 decode is CUDA C"
        return check_gpu(knobs, self.outputs(wl), wl["K"] // 8, wl["batch"], wl["K"], "K / 8")

    def default_knobs(self, wl, target):
        if not target_is_gpu(target):
            return dict(CPU_DEFAULT)
        return default_gpu_knobs(self, wl, target, (4, 2, 1), (32, 16, 8, 4), decode="f32")

    def schedule(self, wl, knobs, target):
        decode = knobs.get("decode", "f32") if target_is_gpu(target) else "f32"
        sch = s_tir.Schedule(tvm.IRModule({"main": self.compute(wl, decode)}))
        if decode == "f32":
            sch.compute_inline(sch.get_sblock("decode"))
        if target_is_gpu(target):
            gpu = {k: v for k, v in knobs.items() if k != "decode"}
            schedule_gemv_gpu(sch, "wq", per_step=8 if decode == "f32" else 1, **gpu)
        else:
            schedule_gemv_cpu(sch, **knobs)
        return sch.mod

    def inputs(self, wl, rng):
        B, N, K = wl["batch"], wl["N"], wl["K"]
        x = rng.standard_normal((B, K)).astype(np.float16)
        wq, scale = random_q4(rng, N, K)
        extra = [rng.standard_normal((B, N)).astype(np.float16)] if self.epilogue == "residual" else []
        return [x, wq, scale, *extra, np.zeros((B, self.outputs(wl)), np.float16)]

    def reference(self, inputs):
        x, wq, scale = inputs[:3]
        acc = x.astype(np.float32) @ dequantize(wq, scale).T
        if self.epilogue == "residual":
            return acc.astype(np.float16) + inputs[3]
        if self.epilogue == "silu_mul":
            gate, up = np.split(acc, 2, axis=1)
            return (gate / (1 + np.exp(-gate)) * up).astype(np.float16)
        return acc.astype(np.float16)

    def bytes_moved(self, wl):
        B, N, K = wl["batch"], wl["N"], wl["K"]
        out = B * self.outputs(wl) * 2 * (2 if self.epilogue == "residual" else 1)
        return N * K // 2 + N * (K // GROUP) * 2 + B * K * 2 + out


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
