"""Llama model presets and the per-shard shape arithmetic.

Both the tuner (which kernels to tune) and the compiler (which kernels to ask
the database for) import this module, so they agree on every shape."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError

GROUP_SIZE = 32  # q4f16_1: one fp16 scale per 32 weights along K


@dataclass(frozen=True)
class LlamaConfig:
    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, LlamaConfig] = {c.name: c for c in [
    # tiny: a small Llama for tests and CPUs (head_dim 32, grouped-query attention)
    LlamaConfig("tiny", 256, 512, 8, 4, 2, 512, 10000.0, 1e-5, 512),
    LlamaConfig("llama2-7b", 4096, 11008, 32, 32, 32, 32000),
    LlamaConfig("llama2-13b", 5120, 13824, 40, 40, 40, 32000),
    LlamaConfig("llama2-70b", 8192, 28672, 64, 8, 80, 32000),
    LlamaConfig("codellama-34b", 8192, 22016, 64, 8, 48, 32000, 1e6, 1e-5, 16384),
    LlamaConfig("llama3-8b", 4096, 14336, 32, 8, 32, 128256, 500000.0, 1e-5, 8192),
    LlamaConfig("llama3-70b", 8192, 28672, 64, 8, 80, 128256, 500000.0, 1e-5, 8192),
]}


def load_config(model: str) -> LlamaConfig:
    """A preset name, or a path to a Hugging Face Llama `config.json` (or its folder)."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"unknown model {model!r}: use one of {', '.join(PRESETS)} or a path to a config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llama":
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise UserError(f"{path}: not a Llama config (model_type={got!r})")
    need = ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"]
    missing = [k for k in need if not isinstance(cfg.get(k), int)]
    if missing:
        raise UserError(f"{path}: Llama config lacks integer {', '.join(missing)}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    # transformers 5 writes rope_theta inside rope_parameters; 4.x at the top level
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0)
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"{path}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != cfg["hidden_size"] // cfg["num_attention_heads"]:
        raise UserError(f"{path}: head_dim {head_dim} is not hidden_size / num_attention_heads; not supported")
    return LlamaConfig(
        name=path.parent.name or "custom",
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        num_hidden_layers=cfg["num_hidden_layers"],
        vocab_size=cfg["vocab_size"],
        rope_theta=float(theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
    )


def check_shards(cfg: LlamaConfig, shards: int) -> None:
    """Stop with one line naming every dimension `shards` does not divide."""
    if not isinstance(shards, int) or shards < 1:
        raise UserError(f"--shards must be a positive integer, got {shards!r}")
    bad = []
    for what, n in [("query heads", cfg.num_attention_heads), ("KV heads", cfg.num_key_value_heads),
                    ("intermediate size", cfg.intermediate_size)]:
        if n % shards:
            bad.append(f"{what} ({n})")
    if not bad and (cfg.intermediate_size // shards) % GROUP_SIZE:
        bad.append(f"intermediate size per shard ({cfg.intermediate_size // shards}) into groups of {GROUP_SIZE}")
    if cfg.hidden_size % GROUP_SIZE:
        bad.append(f"hidden size ({cfg.hidden_size}) into groups of {GROUP_SIZE}")
    if bad:
        raise UserError(f"{shards} shards do not divide {cfg.name}'s " + ", ".join(bad))


@dataclass(frozen=True)
class Linear:
    """One per-shard linear layer of a decode step: y[N] = W[N, K] x[K]."""
    name: str       # qkv_proj, o_proj, gate_up_proj, down_proj, lm_head
    N: int
    K: int
    parallel: str   # "column" (N split), "row" (K split, all-reduce after) or "replicated"
    per_token: int  # how many times one decode step runs it (layers)


def linears(cfg: LlamaConfig, shards: int) -> list[Linear]:
    """The per-shard linear layers of one decode step, with how often each runs."""
    check_shards(cfg, shards)
    h, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    return [
        Linear("qkv_proj", qkv // shards, h, "column", L),
        Linear("o_proj", h, cfg.num_attention_heads * hd // shards, "row", L),
        Linear("gate_up_proj", 2 * cfg.intermediate_size // shards, h, "column", L),
        Linear("down_proj", h, cfg.intermediate_size // shards, "row", L),
        Linear("lm_head", lm_head_rows(cfg, shards), h, "column" if lm_head_split(cfg, shards) else "replicated", 1),
    ]


def lm_head_split(cfg: LlamaConfig, shards: int) -> bool:
    """The LM head is split by vocabulary rows wherever the shards divide the vocabulary (every
    preset), and the logits gathered after it: at TP4 a replicated fp16 head of 32000 x 8192 would
    read 524 MB on every GPU every token, 5% of a Llama-2-70B shard's bytes, where the gather moves
    64 KB of fp16 logits. Every rank then holds the very same logits, so all of them pick the same greedy token."""
    return cfg.vocab_size % shards == 0


def lm_head_rows(cfg: LlamaConfig, shards: int) -> int:
    return cfg.vocab_size // shards if lm_head_split(cfg, shards) else cfg.vocab_size
