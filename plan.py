"""Which kernel template serves each call site of a decode step (and of a prefill step), with
its workload.

The tuner tunes these workloads and the compiler asks the database for the same ones,
so both import this module (and neither imports the other): the keys always agree."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .models import LlamaConfig, check_shards, lm_head_rows

QUANTS = ("q4f16_1", "q0f16", "q0f32")
TEMPLATE_EPS = 1e-5          # the RMSNorm templates' epsilon (Llama-2, Llama-3, CodeLlama)
DEFAULT_CAPACITY = 4096      # KV-cache tokens, fixed at build time
ATTENTION_LENGTHS = (128, 1024, 4096)   # context lengths attention is tuned at
BUILD_LENGTH = 1024          # the one whose record a build uses: the compromise across lengths
PREFILL_BUCKETS = (16, 64, 256)   # prompt lengths a build compiles a batched prefill step for
MAX_PREFILL = 512            # the embedding template's (and the prefill kernels') intended range


def kv_capacity(cfg: LlamaConfig, capacity: int = DEFAULT_CAPACITY) -> int:
    """KV-cache tokens: as asked, at most the model's context."""
    return min(capacity, cfg.max_position_embeddings)


def attention_lengths(capacity: int) -> list[int]:
    """The context lengths attention is tuned at for a cache of `capacity` tokens."""
    return [n for n in ATTENTION_LENGTHS if n <= capacity] or [capacity]


def build_length(capacity: int) -> int:
    """Attention is one kernel for every length: a build takes the record tuned at the
    longest representative length up to 1024, a compromise between short and long contexts."""
    lengths = attention_lengths(capacity)
    return max([n for n in lengths if n <= BUILD_LENGTH] or lengths[:1])


@dataclass(frozen=True)
class KernelCall:
    site: str          # qkv, o, gate_up, down, lm_head, norm, add_norm, rope, attention
    template: str
    workload: dict
    per_token: int     # how often one decode step runs it


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise UserError(f"unknown quantization {quant!r}: use one of {', '.join(QUANTS)}")


def residual_in_gemv(quant: str, shards: int) -> bool:
    """q4f16_1 on one GPU adds the residual in the o/down GEMV epilogue. Otherwise an add
    fused into the next RMSNorm does it (on several GPUs an all-reduce stands between)."""
    return quant == "q4f16_1" and shards == 1


def decode_plan(cfg: LlamaConfig, quant: str, shards: int, batch: int = 1,
                capacity: int = DEFAULT_CAPACITY, attention_length: int | None = None,
                allreduce: str = "nccl") -> list[KernelCall]:
    """The template call sites of one decode step. q0f32 (exact CPU checks) uses only the
    attention templates; its GEMVs and norms are TVM's own operators."""
    check_quant(quant)
    check_shards(cfg, shards)
    if capacity < 1:
        raise UserError(f"KV-cache capacity must be positive, got {capacity}")
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    hd, hq, hkv = cfg.head_dim, cfg.num_attention_heads // shards, cfg.num_key_value_heads // shards
    calls: list[KernelCall] = []
    dtype = "float32" if quant == "q0f32" else "float16"
    heads = {"batch": batch, "q_heads": hq, "kv_heads": hkv, "head_dim": hd, "capacity": capacity, "dtype": dtype}
    length = attention_length or build_length(capacity)
    attention = [KernelCall("rope", "rope_kv_append", {**heads, "theta": float(cfg.rope_theta)}, L),
                 KernelCall("attention", "decode_attention", {**heads, "length": length}, L)]
    if quant == "q0f32":
        return attention

    def gemv(site, template, n, k, per_token):
        q = "q0f16" if template == "q0f16_gemv" else "q4f16_1"
        calls.append(KernelCall(site, template, {"batch": batch, "N": n, "K": k, "quant": q}, per_token))

    plain = "q0f16_gemv" if quant == "q0f16" else "q4f16_1_gemv"
    fused = residual_in_gemv(quant, shards)
    gemv("qkv", plain, (hq + 2 * hkv) * hd, h, L)
    gemv("o", "q4f16_1_gemv_residual" if fused else plain, h, hq * hd, L)
    gemv("gate_up", "q4f16_1_gemv_silu_mul" if quant == "q4f16_1" else plain,
         2 * cfg.intermediate_size // shards, h, L)
    gemv("down", "q4f16_1_gemv_residual" if fused else plain, h, cfg.intermediate_size // shards, L)
    # q4f16_1 quantizes the LM head too, as MLC-LLM's q4f16_1 does (quantize_final_fc): in fp16 it
    # was the biggest single read of a 7B step (262 MB, ~89 us of ~1950 on an H100). Split by vocabulary rows.
    gemv("lm_head", plain, lm_head_rows(cfg, shards), h, 1)

    if abs(cfg.rms_norm_eps - TEMPLATE_EPS) < 1e-12:      # otherwise TVM's rms_norm operator
        norm = {"batch": batch, "H": h}
        if fused:
            calls.append(KernelCall("norm", "rms_norm", norm, 2 * L + 1))
        elif allreduce == "fused" and shards > 1 and batch == 1:   # all-reduce, add and norm: one kernel
            calls.append(KernelCall("norm", "rms_norm", norm, 1))
            calls.append(KernelCall("allreduce_norm", "allreduce_add_norm", {**norm, "shards": shards}, 2 * L))
            # decode_nccl, for GPUs that cannot reach each other's memory: NCCL, then add+norm
            calls.append(KernelCall("add_norm", "add_rms_norm", norm, 0))
        else:
            calls.append(KernelCall("norm", "rms_norm", norm, 1))
            calls.append(KernelCall("add_norm", "add_rms_norm", norm, 2 * L))
    return calls + attention     # the GEMVs first: most of a step's time, so tuned first


def prefill_buckets(capacity: int, buckets=PREFILL_BUCKETS) -> list[int]:
    """The prefill steps a build compiles: each bucket at most the KV capacity (a longer step could
    only write past it), distinct, ascending. A prompt is padded up to the next bucket; one longer
    than the largest goes in chunks of the largest."""
    buckets = [int(b) for b in buckets]
    if any(not 1 <= b <= MAX_PREFILL for b in buckets):
        raise UserError(f"prefill buckets must lie in 1..{MAX_PREFILL}, got {buckets}")
    return sorted({min(b, capacity) for b in buckets})


def prefill_plan(cfg: LlamaConfig, quant: str, shards: int, n: int,
                 capacity: int = DEFAULT_CAPACITY) -> list[KernelCall]:
    """The template call sites of one prefill step of `n` tokens (per_token: calls per step).

    The embedding lookup (fp16 table: q0f16 and q4f16_1 alike), RoPE + KV append and causal
    attention are templates; the logits are taken for one token only, by decode's lm_head GEMV.
    q4f16_1's linear layers are the q4f16_1_gemm template (dequantized on the way to the tensor
    cores), at decode's per-shard shapes; q0f16's are TVM's own matmul. Norms are TVM's
    rms_norm. q0f32 keeps only the attention templates, as decode_plan does."""
    check_quant(quant)
    check_shards(cfg, shards)
    if not 1 <= n <= MAX_PREFILL:
        raise UserError(f"a prefill step takes 1..{MAX_PREFILL} tokens, got {n}")
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    dtype = "float32" if quant == "q0f32" else "float16"
    heads = {"n": n, "q_heads": cfg.num_attention_heads // shards, "kv_heads": cfg.num_key_value_heads // shards,
             "head_dim": cfg.head_dim, "capacity": capacity, "dtype": dtype}
    calls = [KernelCall("rope", "prefill_rope_kv_append", {**heads, "theta": float(cfg.rope_theta)}, L),
             KernelCall("attention", "prefill_attention", heads, L)]
    if quant == "q0f32":
        return calls
    embedding = KernelCall("embedding", "embedding", {"n": n, "vocab": cfg.vocab_size, "H": h, "quant": "q0f16"}, 1)
    decode = plan_by_site(decode_plan(cfg, quant, shards, capacity=capacity))
    if quant == "q4f16_1":
        calls += [KernelCall(site, "q4f16_1_gemm", {"M": n, "N": decode[site].workload["N"],
                                                    "K": decode[site].workload["K"]}, L)
                  for site in ("qkv", "o", "gate_up", "down")]
    return [embedding, *calls, decode["lm_head"]]


def plan_by_site(calls: list[KernelCall]) -> dict[str, KernelCall]:
    return {c.site: c for c in calls}
