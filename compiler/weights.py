"""From a Hugging Face Llama checkpoint (safetensors) to one shard's parameters for the compiler.

Names, shapes and order are those of `param_specs`. HF stores a linear weight as [out, in]; so do
we. Column-parallel layers (qkv, gate_up) give each shard rows: for qkv its query heads, then its KV
heads of k_proj, then of v_proj; for gate_up its slice of gate_proj, then the same slice of up_proj
(the silu_mul GEMV reads the gate from the first half, the up from the second). Row-parallel layers
(o, down) give each shard a slice of columns (K). The LM head gives each shard a slice of its rows
(vocabulary) where the shards divide the vocabulary (models.lm_head_split). q4f16_1 quantizes every
linear layer, the LM head included (MLC-LLM's q4f16_1 does too). Embedding and norms are replicated.

The safetensors format is read here directly (an 8-byte header length, a JSON header, raw
little-endian data): bf16 has no NumPy type, so the `safetensors` package would need torch for it,
and a memory map per tensor keeps a big checkpoint on disk until a shard's slice of it is needed.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..models import GROUP_SIZE, LlamaConfig, lm_head_rows, lm_head_split, linears, load_config
from ..plan import QUANTS, check_quant

__all__ = ["QUANTS", "convert", "param_specs", "quantize_q4", "read_checkpoint", "shard_param"]


# safetensors dtypes we read; BF16 is read as its raw 16 bits and widened to float32.
_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
# The shapes config.json must agree on with the model the caller asked for.
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "num_hidden_layers", "vocab_size")


def _float_dtype(quant: str) -> str:
    return "float32" if quant == "q0f32" else "float16"


def param_specs(cfg: LlamaConfig, quant: str, shards: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of one shard's parameters, in the order the model takes them."""
    check_quant(quant)
    lin = {x.name: (x.N, x.K) for x in linears(cfg, shards)}  # checks the shard count too
    fdt, H, V = _float_dtype(quant), cfg.hidden_size, cfg.vocab_size
    if quant == "q4f16_1":
        for what, (_, k) in lin.items():
            if k % GROUP_SIZE:
                raise UserError(f"q4f16_1 needs {what}'s K per shard ({k}) in groups of {GROUP_SIZE}: "
                                f"use fewer shards or q0f16")
    specs: dict[str, tuple[tuple[int, ...], str]] = {"embed.weight": ((V, H), fdt)}

    def linear(name, n, k):
        if quant == "q4f16_1":
            specs[f"{name}.qweight"] = ((n, k // 8), "uint32")
            specs[f"{name}.qscale"] = ((n, k // GROUP_SIZE), "float16")
        else:
            specs[f"{name}.weight"] = ((n, k), fdt)

    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        specs[p + "input_norm.weight"] = ((H,), fdt)
        linear(p + "qkv", *lin["qkv_proj"])
        linear(p + "o", *lin["o_proj"])
        specs[p + "post_norm.weight"] = ((H,), fdt)
        linear(p + "gate_up", *lin["gate_up_proj"])
        linear(p + "down", *lin["down_proj"])
    specs["norm.weight"] = ((H,), fdt)
    linear("lm_head", lm_head_rows(cfg, shards), H)   # q4f16_1 quantizes it too, as MLC-LLM's does
    return specs


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensors a Llama of `cfg` needs, with their shapes."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        })
    shapes["model.norm.weight"] = (H,)
    shapes["lm_head.weight"] = (V, H)
    return shapes


# ---- reading safetensors ----

def _header(file: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (dtype, shape, byte offset in the file), each tensor checked to lie inside the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out = {}
        for name, t in header.items():
            dtype, shape, (start, end) = t["dtype"], tuple(int(d) for d in t["shape"]), t["data_offsets"]
            if dtype in _NUMPY and end - start != math.prod(shape) * np.dtype(_NUMPY[dtype]).itemsize:
                raise ValueError(f"tensor {name!r} has {end - start} bytes for shape {list(shape)}")
            if not 0 <= start <= end <= size - 8 - n:
                raise ValueError(f"tensor {name!r} lies past the end of the file (truncated?)")
            out[name] = (dtype, shape, 8 + n + start)
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({e})") from None


class Checkpoint(Mapping):
    """HF tensor name -> np.ndarray over a folder's safetensors files. A tensor is memory-mapped only
    when asked for (read-only; bf16 comes back as float32), so nothing is held in memory twice."""

    def __init__(self, folder: Path, files: list[Path], tied: bool = False):
        self.folder = folder
        self._at = {name: (file, *entry) for file in files for name, entry in _header(file).items()}
        if tied and "lm_head.weight" not in self._at and "model.embed_tokens.weight" in self._at:
            self._at["lm_head.weight"] = self._at["model.embed_tokens.weight"]

    def __len__(self):
        return len(self._at)

    def __iter__(self):
        return iter(self._at)

    def __contains__(self, name):  # Mapping's would map the tensor to find out
        return name in self._at

    def info(self, name: str) -> tuple[Path, str, tuple[int, ...]]:
        """(file, safetensors dtype, shape) without reading the data."""
        file, dtype, shape, _ = self._at[name]
        return file, dtype, shape

    def __getitem__(self, name: str) -> np.ndarray:
        file, dtype, shape, offset = self._at[name]
        if dtype not in _NUMPY:
            raise UserError(f"{file}: tensor {name!r} is {dtype}, not float (a quantized checkpoint?)")
        a = np.memmap(file, _NUMPY[dtype], "r", offset, shape)
        return (a.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else a


def read_checkpoint(path) -> Checkpoint:
    """The safetensors tensors of a HF model folder: those of `model.safetensors.index.json`'s files
    when there is one, else of every `*.safetensors` file there (usually one `model.safetensors`)."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (want a Hugging Face model folder of *.safetensors)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [folder / f for f in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: not a readable safetensors index ({e})") from None
        for f in files:
            if not f.is_file():
                raise UserError(f"{index} names {f.name}, which is not in {folder}")
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            bins = " (only PyTorch .bin files: re-save with safe_serialization=True)" \
                if any(folder.glob("*.bin")) else ""
            raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json{bins}")
    try:  # a HF model with tied embeddings saves no lm_head.weight
        tied = json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", False) is True
    except (OSError, ValueError, AttributeError):
        tied = False  # no or bad config.json: load_config reports it where a config is needed
    return Checkpoint(folder, files, tied)


# ---- quantizing and sharding ----

def quantize_q4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> (qweight uint32 [N, K/8], qscale float16 [N, K/32]), MLC-LLM's q4f16_1:
    per group of 32 along K, scale = max|w| / 7, q = clip(round(w / scale) + 7, 0, 14)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    g = w.reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    scale = (np.abs(g).max(axis=2) / 7).astype(np.float16)
    # Divide by the fp16 scale that is stored, so |w - dequantized| <= stored scale / 2 holds.
    div = scale.astype(np.float32)
    div[div == 0] = 1  # an all-zero (or fp16-underflowing) group: q = 7 dequantizes to 0
    q = np.rint(g / div[:, :, None])
    q += 7
    np.clip(q, 0, 14, out=q)
    q = q.astype(np.uint8).reshape(n, k)
    # pack_q4's layout, fast: element 2j in the low nibble of byte j, 2j+1 in the high one, and
    # four bytes make a little-endian uint32, so nibble i of word j is element 8j + i.
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.view("<u4"), scale


def _part(n: int, shards: int, shard: int) -> slice:
    return slice(shard * n // shards, (shard + 1) * n // shards)


def _rows(sections, shards: int, shard: int) -> np.ndarray:
    """A column-parallel weight's shard: the same slice of each section's rows (q, k, v / gate, up)."""
    return np.concatenate([w[_part(len(w), shards, shard)] for w in sections])


def _cols(w: np.ndarray, shards: int, shard: int) -> np.ndarray:
    """A row-parallel weight's shard: a slice of its last axis (K, or K/8 words, K/32 scales)."""
    return w[..., _part(w.shape[-1], shards, shard)]


def shard_param(name: str, full: np.ndarray, cfg: LlamaConfig, shards: int, shard: int) -> np.ndarray:
    """Shard `shard` of `shards` of a parameter named and laid out as by `param_specs(cfg, quant, 1)`:
    the same array `convert` gives that shard. q4 params shard without requantizing, since every
    shard boundary along K falls on a group boundary (param_specs checks it)."""
    kind = name.split(".")[2] if name.startswith("layers.") else ""
    if kind == "qkv":
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return _rows(np.split(full, [q, q + kv]), shards, shard)
    if kind == "gate_up":
        return _rows(np.split(full, 2), shards, shard)
    if kind in ("o", "down"):
        return _cols(full, shards, shard)
    if name.startswith("lm_head.") and lm_head_split(cfg, shards):
        return _rows([full], shards, shard)
    return full  # embedding, norms (and an LM head the shards do not divide): replicated


# ---- converting ----

def _model_config(folder: Path, cfg: LlamaConfig | None) -> LlamaConfig:
    """The checkpoint's config (None: take it from config.json), checked against the one asked for."""
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (want a Hugging Face model folder of *.safetensors)")
    if not (folder / "config.json").is_file():
        if cfg is None:
            raise UserError(f"{folder}: no config.json, so which model it holds is unknown")
        return cfg
    found = load_config(str(folder / "config.json"))  # a path, never taken for a preset name
    if cfg is None:
        return found
    diff = [f"{k} {getattr(found, k)} (not {getattr(cfg, k)})" for k in _SHAPE_FIELDS
            if getattr(found, k) != getattr(cfg, k)]
    if diff:
        raise UserError(f"{folder}/config.json is not a {cfg.name} checkpoint: it has " + ", ".join(diff))
    return cfg


def _check_tensors(ckpt: Checkpoint, cfg: LlamaConfig) -> None:
    """Every tensor present, float and of the right shape, before any slow work starts."""
    biases = [n for n in ckpt if n.endswith(".bias")]
    if biases:
        raise UserError(f"{ckpt.folder}: tensor {biases[0]!r}: Llamas with attention/MLP biases are "
                        "not supported")
    for name, shape in hf_shapes(cfg).items():
        if name not in ckpt:
            tied = " (and config.json does not set tie_word_embeddings)" if name == "lm_head.weight" else ""
            raise UserError(f"{ckpt.folder}: tensor {name!r} is missing{tied}")
        file, dtype, got = ckpt.info(name)
        if dtype not in _NUMPY:
            raise UserError(f"{file}: tensor {name!r} is {dtype}, not float (a quantized checkpoint?)")
        if got != shape:
            raise UserError(f"{file}: tensor {name!r} has shape {list(got)}, {cfg.name} needs {list(shape)}")


def convert(checkpoint_dir, cfg: LlamaConfig | None, quant: str, shards: int = 1,
            shard: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of shard `shard` of `shards`, in `param_specs(cfg, quant, shards)` order, each of
    exactly its spec's shape and dtype. cfg None: the checkpoint's own config.json. Everything that
    can be checked without reading weights is checked here, before the first item."""
    folder = Path(checkpoint_dir)
    cfg = _model_config(folder, cfg)
    param_specs(cfg, quant, shards)  # checks quant and shards
    if not (isinstance(shard, int) and 0 <= shard < shards):
        raise UserError(f"shard {shard!r} is not one of 0..{shards - 1}")
    ckpt = read_checkpoint(folder)
    _check_tensors(ckpt, cfg)
    return _convert(ckpt, cfg, quant, shards, shard)


def _convert(ckpt: Checkpoint, cfg: LlamaConfig, quant: str, shards: int, shard: int):
    fdt = _float_dtype(quant)

    def plain(name, w):
        w = np.array(w, fdt, order="C")  # a copy: never a view of the memory-mapped file
        if not np.isfinite(w).all():
            raise UserError(f"{ckpt.folder}: {name} has values that are not finite in {fdt}")
        return name, w

    def linear(name, w):
        if quant != "q4f16_1":
            yield plain(f"{name}.weight", w)
            return
        qweight, qscale = quantize_q4(w)
        if not np.isfinite(qscale).all():
            raise UserError(f"{ckpt.folder}: {name} has weights that are not finite or too large for q4f16_1")
        yield f"{name}.qweight", qweight
        yield f"{name}.qscale", qscale

    yield plain("embed.weight", ckpt["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        hf, p = f"model.layers.{i}.", f"layers.{i}."
        yield plain(p + "input_norm.weight", ckpt[hf + "input_layernorm.weight"])
        yield from linear(p + "qkv", _rows([ckpt[hf + f"self_attn.{x}_proj.weight"] for x in "qkv"],
                                           shards, shard))
        yield from linear(p + "o", _cols(ckpt[hf + "self_attn.o_proj.weight"], shards, shard))
        yield plain(p + "post_norm.weight", ckpt[hf + "post_attention_layernorm.weight"])
        yield from linear(p + "gate_up", _rows([ckpt[hf + "mlp.gate_proj.weight"], ckpt[hf + "mlp.up_proj.weight"]],
                                               shards, shard))
        yield from linear(p + "down", _cols(ckpt[hf + "mlp.down_proj.weight"], shards, shard))
    yield plain("norm.weight", ckpt["model.norm.weight"])
    head = ckpt["lm_head.weight"]
    yield from linear("lm_head", _rows([head], shards, shard) if lm_head_split(cfg, shards) else head)
