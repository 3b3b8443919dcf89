"""q4f16_1 GEMV with the residual add fused: y = x @ W^T + residual (o_proj and
down_proj on one GPU, where no all-reduce stands between the GEMV and the add)."""
from . import register
from .q4_gemv import Q4Gemv


@register
class Q4GemvResidual(Q4Gemv):
    name = "q4f16_1_gemv_residual"
    epilogue = "residual"
