"""q4f16_1 weights back to fp16 for the prefill step, which multiplies them with TVM's own
matmul (the GEMV templates serve batch 1..4 only; a prompt is compute-bound and one call).

Nibble e of word w is element 8w + e, value (q - 7) * scale[n, k // 32] (as q4_gemv.py). The
product is taken in fp32 and rounded once to fp16: the fp16 product, since q - 7 and the scale
are exact in fp16. Not a template: the build leaves it to TVM (dlight on GPUs), and Relax's
FuseOps may not merge it into the matmul (op_pattern opaque), so it stays one elementwise kernel
whatever the matmul's schedule."""
from __future__ import annotations

from tvm.script import tirx as T

from ..models import GROUP_SIZE

U32, F16 = "uint32", "float16"   # names, not strings, in annotations (pyflakes)


def dequantize_q4(N: int, K: int):
    """PrimFunc (wq [N, K/8] uint32, scale [N, K/32] fp16) -> w [N, K] fp16."""

    @T.prim_func(s_tir=True)
    def dequantize_q4(wq: T.Buffer((N, K // 8), U32), scale: T.Buffer((N, K // GROUP_SIZE), F16),
                      w: T.Buffer((N, K), F16)):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        for n, k in T.grid(N, K):
            with T.sblock("dequantize"):
                vn, vk = T.axis.remap("SS", [n, k])
                w[vn, vk] = T.Cast("float16", (
                    T.Cast("float32", (wq[vn, vk // 8] >> T.Cast("uint32", vk % 8 * 4)) & T.uint32(15))
                    - T.float32(7)) * T.Cast("float32", scale[vn, vk // GROUP_SIZE]))

    return dequantize_q4
