"""From a model and a shard count to the distinct kernel instances worth tuning."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..models import Linear, linears, load_config

KINDS = ("gemv", "norm")
QUANTS = ("q4f16_1", "q0f16")


@dataclass(frozen=True)
class KernelInstance:
    template: str
    workload: dict
    layers: tuple[str, ...]   # which layers of the model use it
    calls_per_token: int      # how often one decode step runs it


def gemv_template(lin: Linear, quant: str, shards: int) -> str:
    """Which template serves a linear layer. On one GPU the residual add fuses into o/down;
    with several, an all-reduce stands between them (the all-reduce fusion does the add)."""
    if quant == "q0f16" or lin.name == "lm_head":   # q4f16_1 models keep an fp16 head
        return "q0f16_gemv"
    if lin.name == "gate_up_proj":
        return "q4f16_1_gemv_silu_mul"
    if lin.name in ("o_proj", "down_proj") and shards == 1:
        return "q4f16_1_gemv_residual"
    return "q4f16_1_gemv"


def kernel_instances(model: str, shards: int, kernels: list[str] | None = None, batch: int = 1,
                     quant: str = "q4f16_1") -> list[KernelInstance]:
    kernels = kernels or ["gemv"]
    unknown = [k for k in kernels if k not in KINDS]
    if unknown:
        raise UserError(f"unknown kernel kind(s) {', '.join(unknown)}: use {', '.join(KINDS)}")
    if quant not in QUANTS:
        raise UserError(f"unknown quantization {quant!r}: use {', '.join(QUANTS)}")
    cfg = load_config(model)
    out: dict[tuple, KernelInstance] = {}

    def add(template: str, wl: dict, layer: str, calls: int) -> None:
        key = (template, *sorted(wl.items()))
        prev = out.get(key)
        out[key] = KernelInstance(template, wl, (prev.layers if prev else ()) + (layer,),
                                  (prev.calls_per_token if prev else 0) + calls)

    if "gemv" in kernels:
        for lin in linears(cfg, shards):
            template = gemv_template(lin, quant, shards)
            add(template, {"batch": batch, "N": lin.N, "K": lin.K,
                           "quant": "q0f16" if template == "q0f16_gemv" else "q4f16_1"}, lin.name, lin.per_token)
    if "norm" in kernels:
        # Replicated on every shard. The first layer's input norm and the final norm have no
        # residual to add; the two norms inside each later step add it first.
        wl = {"batch": batch, "H": cfg.hidden_size}
        add("rms_norm", wl, "input_norm", 2)
        add("add_rms_norm", wl, "post_attention_norm", 2 * cfg.num_hidden_layers - 1)
    return list(out.values())
