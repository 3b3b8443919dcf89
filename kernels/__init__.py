"""Kernel templates, one per file, looked up by name."""
from __future__ import annotations

from .template import KnobError, Template

_REGISTRY: dict[str, Template] = {}
# What every kernel build compiles with: cp.async where a schedule's software pipeline asks for it
# (q4f16_1_gemm's `pipeline`); no other kernel's code changes with it.
PASS_CONFIG = {"tirx.use_async_copy": True}


def register(template_cls):
    """Class decorator: make a template findable by its name."""
    inst = template_cls()
    _REGISTRY[inst.name] = inst
    return template_cls


def _load_all() -> None:
    # Imported here, not at module top, so `register` exists before they run.
    from . import (add_rms_norm, f16_gemv, q4_gemv, q4_gemv_residual, q4_gemv_silu_mul,  # noqa: F401
                   rms_norm)
    from . import decode_attention, rope_kv_append  # noqa: F401
    from . import embedding, prefill_attention, prefill_rope_kv_append  # noqa: F401
    from . import allreduce_add_norm, q4_gemm  # noqa: F401


def get_template(name: str) -> Template:
    """The template called `name`; KeyError naming the known ones otherwise."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown kernel template {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def all_templates() -> dict[str, Template]:
    _load_all()
    return dict(_REGISTRY)


__all__ = ["KnobError", "PASS_CONFIG", "Template", "register", "get_template", "all_templates"]
