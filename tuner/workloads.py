"""From a model and a shard count to the distinct kernel instances worth tuning: the
call sites of `shardtune.plan` (the ones the compiler asks the database for), grouped
by kind, with attention at several context lengths."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..models import load_config
from ..plan import PREFILL_BUCKETS, attention_lengths, decode_plan, kv_capacity, prefill_buckets, prefill_plan

KINDS = ("gemv", "norm", "attention", "allreduce", "gemm")
QUANTS = ("q4f16_1", "q0f16")
# "allreduce": the fused all-reduce + add + RMSNorm of sharded NVIDIA builds (shards > 1). One
# GPU stands in for all when tuning it (the peers' flags preset): the barrier's cross-GPU wait is
# not in the time, the rest of the kernel is.
# "gemm": the prefill steps' q4f16_1 linear layers, at each default prompt bucket (q4f16_1 only).
SITES = {"gemv": ("qkv", "o", "gate_up", "down", "lm_head"), "norm": ("norm", "add_norm"),
         "attention": ("rope", "attention"), "allreduce": ("allreduce_norm",), "gemm": ()}


@dataclass(frozen=True)
class KernelInstance:
    template: str
    workload: dict
    layers: tuple[str, ...]   # which call sites of the model use it
    calls_per_token: int      # how often one decode step runs it


def check_kinds(kinds: list[str]) -> None:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown kernel kind(s) {', '.join(unknown)}: use {', '.join(KINDS)}")


def kernel_instances(model: str, shards: int, kernels: list[str] | None = None, batch: int = 1,
                     quant: str = "q4f16_1") -> list[KernelInstance]:
    kernels = kernels or ["gemv"]
    check_kinds(kernels)
    if quant not in QUANTS:
        raise UserError(f"unknown quantization {quant!r}: use {', '.join(QUANTS)}")
    cfg = load_config(model)
    capacity = kv_capacity(cfg)
    calls = [c for c in decode_plan(cfg, quant, shards, batch=batch, capacity=capacity) if c.site != "attention"]
    if "allreduce" in kernels:
        calls += [c for c in decode_plan(cfg, quant, shards, batch=batch, capacity=capacity, allreduce="fused")
                  if c.site == "allreduce_norm"]
    # attention is tuned at each representative length, shortest first; a build uses one (plan.py)
    calls += [c for length in attention_lengths(capacity)
              for c in decode_plan(cfg, quant, shards, batch=batch, capacity=capacity, attention_length=length)
              if c.site == "attention"]
    wanted = {site for kind in kernels for site in SITES[kind]}
    calls = [c for c in calls if c.site in wanted]
    if "gemm" in kernels and quant != "q4f16_1":
        raise UserError(f"--kernels gemm is q4f16_1's prefill GEMM; {quant} prefills with TVM's matmul")
    if "gemm" in kernels:
        calls += [c for n in prefill_buckets(capacity, PREFILL_BUCKETS)
                  for c in prefill_plan(cfg, quant, shards, n, capacity) if c.template == "q4f16_1_gemm"]
    out: dict[tuple, KernelInstance] = {}
    for c in calls:
        key = (c.template, *sorted(c.workload.items()))
        prev = out.get(key)
        if prev is not None and c.site in prev.layers:   # the same attention length twice
            continue
        out[key] = KernelInstance(c.template, c.workload, (prev.layers if prev else ()) + (c.site,),
                                  (prev.calls_per_token if prev else 0) + c.per_token)
    return list(out.values())
