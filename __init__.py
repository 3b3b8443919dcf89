"""shardtune: kernel templates, per-arch and per-shard-count tuning, a shared
tuning database, and a tensor-parallel Llama compiler on Apache TVM."""
from __future__ import annotations

__version__ = "0.1.0"


def tune(**kwargs):
    """Tune the kernels of a model for an arch and shard count; see `shardtune.tuner.api.tune`."""
    from .tuner.api import tune as _tune

    return _tune(**kwargs)


def build(out_dir: str, **kwargs):
    """Build a model folder; see `shardtune.compiler.build.build`."""
    from .compiler.build import build as _build

    return _build(out_dir, **kwargs)


def load(path: str, seed: int = 0, allreduce: str | None = None):
    """A built model, ready to `generate` and `bench`; see `shardtune.runtime.engine.Model`.
    `allreduce="nccl"` runs a fused-all-reduce build through NCCL instead."""
    from .runtime.engine import load as _load

    return _load(path, seed, allreduce=allreduce)
