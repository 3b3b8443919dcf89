"""shardtune: kernel templates, per-arch and per-shard-count tuning, a shared
tuning database, and a tensor-parallel Llama compiler on Apache TVM."""
from __future__ import annotations

__version__ = "0.1.0"


def tune(**kwargs):
    """Tune the kernels of a model for an arch and shard count; see `shardtune.tuner.api.tune`."""
    from .tuner.api import tune as _tune

    return _tune(**kwargs)
