"""What every kernel template is: a compute definition, schedules as functions of
knobs, a declared knob space and a NumPy reference. Templates know nothing about
databases or search; the tuner and the compiler only talk to this interface."""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
from typing import Any

import numpy as np


def _kernel_modules(cls) -> set:
    package = __name__.rsplit(".", 1)[0]
    mods = {inspect.getmodule(c) for c in cls.__mro__ if c.__module__.startswith(package)}
    for mod in list(mods):
        for obj in vars(mod).values():
            owner = inspect.getmodule(obj)
            if owner is not None and owner.__name__.startswith(package + "."):
                mods.add(owner)
    return mods


@functools.lru_cache(maxsize=None)
def _hash_sources(cls, space: str) -> str:
    mods = sorted(_kernel_modules(cls), key=lambda m: m.__name__)
    text = "\n".join(inspect.getsource(m) for m in mods) + "\n" + space
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def target_is_gpu(target) -> bool:
    return target.kind.name in ("cuda", "rocm", "vulkan", "metal", "opencl")


class KnobError(ValueError):
    """Knobs that are not in a template's declared space."""


class Template:
    name: str = ""
    #: knob name -> allowed values, per kind of target ("gpu", "cpu").
    gpu_knobs: dict[str, list] = {}
    cpu_knobs: dict[str, list] = {}

    @property
    def knob_space(self) -> dict[str, list]:
        """Every declared knob, GPU and CPU together."""
        return {**self.gpu_knobs, **self.cpu_knobs}

    def space_for(self, target) -> dict[str, list]:
        return self.gpu_knobs if target_is_gpu(target) else self.cpu_knobs

    # --- to implement -------------------------------------------------------
    def compute(self, wl: dict):
        """The unscheduled PrimFunc for workload `wl`."""
        raise NotImplementedError

    def schedule(self, wl: dict, knobs: dict, target) -> Any:
        """An IRModule holding the scheduled PrimFunc under the name "main"."""
        raise NotImplementedError

    def check(self, wl: dict, knobs: dict, target) -> str | None:
        """Why these knobs cannot build for this workload/target, or None.
        Lets the tuner prune a candidate before spending a build on it."""
        return None

    def default_knobs(self, wl: dict, target) -> dict:
        """A sensible untuned choice, used when the database has no record."""
        raise NotImplementedError

    def inputs(self, wl: dict, rng: np.random.Generator) -> list[np.ndarray]:
        """Random inputs followed by an output buffer, as the kernel takes them."""
        raise NotImplementedError

    def output_specs(self, wl: dict) -> list[tuple[tuple, str]]:
        """(shape, dtype) of each new output, in order: the arguments after the inputs
        (scratch included). The model compiler allocates them."""
        raise NotImplementedError

    #: whether TVM's dlight rules can schedule this compute at all (attention: no)
    dlight_baseline: bool = True

    def dlight_schedule(self, wl: dict, target, fallback: bool = True):
        """The compute scheduled by TVM's own dlight GPU rules: the baseline every tuned record
        must beat. Where only dlight's Fallback rule (one thread per output) applies, that, or
        None with `fallback=False` (a build then takes the default knobs instead)."""
        import tvm
        from tvm.s_tir import dlight as dl

        mod = tvm.IRModule({"main": self.compute(wl)})
        with target:
            try:
                return dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
                                               dl.gpu.Fallback())(mod)
            except Exception:  # noqa: BLE001 - dlight raises assorted errors on patterns it half-knows
                # Its GEMV and Reduction rules assert on the SiLU(gate) * up epilogue.
                return dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod) if fallback else None

    def untuned_uses_dlight(self, target) -> bool:
        """Whether a GPU build without a record takes dlight's schedule (else the default knobs)."""
        return self.dlight_baseline

    def reference(self, inputs: list[np.ndarray]):
        """The NumPy result the kernel's output must match; a list when it has several
        outputs (they are the last arguments, in order)."""
        raise NotImplementedError

    def relative_error(self, inputs: list[np.ndarray], run) -> float:
        """Run `run(outputs_to_fill)` on outputs poisoned with NaN (an unwritten element
        cannot pass) and return the worst ||out - ref|| / ||ref|| over the outputs.
        `run` gets the number of outputs and returns them as NumPy arrays after the call."""
        refs = self.reference(inputs)
        refs = list(refs) if isinstance(refs, (list, tuple)) else [refs]
        outs = run(len(refs))
        worst = 0.0
        for out, ref in zip(outs, refs):
            ref = ref.astype(np.float64)
            err = np.linalg.norm(out.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30)
            worst = max(worst, float(err)) if np.isfinite(err) else float("nan")
            if worst != worst:
                break
        return worst

    def bytes_moved(self, wl: dict) -> int:
        """The fewest bytes the kernel must move through device memory."""
        raise NotImplementedError

    def sample_knobs(self, wl: dict, target, rng: np.random.Generator, count: int,
                     first: tuple | list = ()) -> list[dict]:
        """`first`, then random valid settings of the target's knob space, all distinct:
        `count` in all, or fewer where the space holds fewer (the draws are bounded)."""
        out = list(first)
        space = self.space_for(target)
        for _ in range(50 * count):
            if len(out) >= count:
                break
            knobs = {name: values[rng.integers(len(values))] for name, values in space.items()}
            if knobs not in out and self.check(wl, knobs, target) is None:
                out.append(knobs)
        return out

    #: tolerance of ||out - ref|| / ||ref|| for the numerics gate
    tolerance: float = 2e-3

    # --- shared ---------------------------------------------------------------
    def validate_knobs(self, knobs: dict) -> None:
        """Raise KnobError unless `knobs` sets every knob of the GPU or the CPU space,
        each to a declared value, and nothing else."""
        if not isinstance(knobs, dict):
            raise KnobError(f"{self.name}: knobs must be an object, got {type(knobs).__name__}")
        space = self.gpu_knobs if set(knobs) == set(self.gpu_knobs) else self.cpu_knobs
        missing = sorted(set(space) - set(knobs))
        extra = sorted(set(knobs) - set(space))
        if missing or extra:
            raise KnobError(f"{self.name}: knobs missing {missing} / unknown {extra}")
        for key, allowed in space.items():
            if knobs[key] not in allowed:
                raise KnobError(f"{self.name}: knob {key}={knobs[key]!r} is not one of {allowed}")

    @property
    def source_hash(self) -> str:
        """Changes whenever the code this template runs or its knob space changes, so stored
        records made with an older version are recognised as stale: the modules of its
        classes and the kernel modules they take functions from (shared schedules)."""
        return _hash_sources(type(self), json.dumps(self.knob_space, sort_keys=True))

    def __repr__(self) -> str:
        return f"<template {self.name}>"
