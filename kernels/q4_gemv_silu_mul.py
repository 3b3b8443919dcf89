"""q4f16_1 gate/up GEMV with the MLP activation fused: the weight is [gate; up]
(N rows, N/2 each) and y = SiLU(x @ gate^T) * (x @ up^T) has N/2 columns. One thread
computes both rows of an output, so the epilogue needs no exchange between threads."""
from . import register
from .q4_gemv import Q4Gemv


@register
class Q4GemvSiluMul(Q4Gemv):
    name = "q4f16_1_gemv_silu_mul"
    epilogue = "silu_mul"
