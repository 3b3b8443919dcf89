"""From a model and a shard count to the distinct kernel instances worth tuning."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..models import linears, load_config

# Which template serves which layer, per quantization. Fused epilogues come as
# their own templates; until then every projection is a plain GEMV.
KERNELS = {"gemv": "q4f16_1_gemv"}


@dataclass(frozen=True)
class KernelInstance:
    template: str
    workload: dict
    layers: tuple[str, ...]   # which layers of the model use it
    calls_per_token: int      # how often one decode step runs it


def kernel_instances(model: str, shards: int, kernels: list[str] | None = None,
                     batch: int = 1) -> list[KernelInstance]:
    kernels = kernels or ["gemv"]
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise UserError(f"unknown kernel kind(s) {', '.join(unknown)}: use {', '.join(KERNELS)}")
    cfg = load_config(model)
    out: dict[str, KernelInstance] = {}
    for kind in kernels:
        template = KERNELS[kind]
        for lin in linears(cfg, shards):
            if lin.name == "lm_head":   # fp16 in q4f16_1 models: another template
                continue
            wl = {"batch": batch, "N": lin.N, "K": lin.K, "quant": "q4f16_1"}
            key = f"{template}:{lin.N}x{lin.K}"
            prev = out.get(key)
            out[key] = KernelInstance(template, wl, (prev.layers if prev else ()) + (lin.name,),
                                      (prev.calls_per_token if prev else 0) + lin.per_token)
    return list(out.values())
