"""RMSNorm with the residual add before it fused: h = x + residual, y = RMSNorm(h) * weight;
both h (the next residual stream) and y are written. See rms_norm.py."""
from . import register
from .rms_norm import RMSNorm


@register
class AddRMSNorm(RMSNorm):
    name = "add_rms_norm"
    add = True
