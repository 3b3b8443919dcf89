"""What makes a record well-formed (its shape) and what makes it usable here (not stale).

Shape errors are refused outright; staleness is only reported, because a record
that is stale today (older template, other TVM) is still a true measurement."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import typing
from typing import NamedTuple

from .records import Record, canonical

STATUSES = ("complete", "partial")

_TYPES = typing.get_type_hints(Record)          # field -> str | int | float | dict
_REQUIRED = [f.name for f in dataclasses.fields(Record)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


class RecordError(ValueError):
    """A record with missing fields, unknown fields or values of the wrong type."""


class Stale(NamedTuple):
    record: Record
    reason: str


def check_record(obj: Record | dict) -> Record:
    """A normalised copy of `obj` (ints where ints belong, floats where floats do),
    or RecordError saying what is wrong. Normalising first makes the content hash,
    and so the record id, independent of how a number happened to be spelled."""
    d = obj.to_dict() if isinstance(obj, Record) else obj
    if not isinstance(d, dict):
        raise RecordError(f"a record must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(_TYPES))
    if unknown:
        raise RecordError(f"unknown field(s) {', '.join(unknown)}")
    missing = [name for name in _REQUIRED if name not in d]
    if missing:
        raise RecordError(f"missing field(s) {', '.join(missing)}")
    out = {}
    for name, value in d.items():
        out[name] = _check_value(name, _TYPES[name], value)
    if out["shards"] < 1:
        raise RecordError(f"shards must be >= 1, got {out['shards']}")
    if out["latency_us"] <= 0 or out["latency_spread_us"] < 0:
        raise RecordError("latency_us must be > 0 and latency_spread_us >= 0")
    if out.get("status", "complete") not in STATUSES:
        raise RecordError(f"status must be one of {', '.join(STATUSES)}, got {out['status']!r}")
    if not out["template"] or not out["arch"]:
        raise RecordError("template and arch must not be empty")
    return Record(**out)


def _check_value(name, typ, value):
    # numbers.Integral/Real also let NumPy scalars in, as plain int/float.
    if typ is str:
        ok = isinstance(value, str)
    elif typ is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if ok:
            value = int(value)
    elif typ is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise RecordError(f"field {name} must be a finite number, got {value}")
    elif typ is dict:
        ok = isinstance(value, dict)
        if ok:
            try:
                canonical_strict(value)
            except (TypeError, ValueError) as e:
                raise RecordError(f"field {name} is not plain JSON: {e}") from None
    else:  # a field type this module does not know: records.py grew, so must this
        raise AssertionError(f"unhandled Record field type {typ!r} for {name}")
    if not ok:
        raise RecordError(f"field {name} must be {_TYPE_NAMES[typ]}, got {type(value).__name__}")
    return value


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object"}


def canonical_strict(obj) -> str:
    """canonical(), but refusing NaN/Infinity, which are not JSON."""
    json.dumps(obj, allow_nan=False)
    return canonical(obj)


def record_id(rec: Record) -> str:
    """Content hash of the whole record: the same measurement imported twice is one row."""
    return hashlib.sha256(canonical(rec.to_dict()).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def installed_tvm_version() -> str:
    import tvm  # imported late: it takes a second and many commands never need it

    return tvm.__version__


class Validator:
    """Why a record cannot be applied here, or None. Caches template lookups, as one
    validation pass asks about the same few templates thousands of times."""

    def __init__(self):
        self._templates: dict[str, object] = {}
        self._targets: dict[str, object] = {}

    def template(self, name: str):
        """The current template called `name`, or None if there is none."""
        if name not in self._templates:
            from ..kernels import get_template

            try:
                tpl = get_template(name)
                self._templates[name] = (tpl, tpl.source_hash)
            except KeyError:
                self._templates[name] = None
        return self._templates[name]

    def reason(self, rec: Record) -> str | None:
        found = self.template(rec.template)
        if found is None:
            return f"unknown template {rec.template!r}"
        tpl, current_hash = found
        if rec.template_hash != current_hash:
            return f"template {rec.template} changed (record {rec.template_hash}, now {current_hash})"
        try:
            tpl.validate_knobs(rec.knobs)
        except ValueError as e:  # KnobError
            return f"knobs outside the declared space: {e}"
        refused = self.refused(tpl, rec)
        if refused:
            return refused
        if rec.tvm_version != installed_tvm_version():
            return f"tuned with TVM {rec.tvm_version or '(unknown)'}, installed {installed_tvm_version()}"
        tolerance = getattr(tpl, "tolerance", None)
        if tolerance is not None and rec.max_rel_error > tolerance:
            return f"max_rel_error {rec.max_rel_error:g} exceeds the template's tolerance {tolerance:g}"
        return None

    def knob_error(self, rec: Record) -> str | None:
        """Knobs outside the space of the very template version the record claims.
        Such a record is wrong, not stale: refused at import. (Records of an older
        template version may use knobs the current space dropped; they are only stale.)"""
        found = self.template(rec.template)
        if found is None or rec.template_hash != found[1]:
            return None
        try:
            found[0].validate_knobs(rec.knobs)
        except ValueError as e:
            return str(e)
        return self.refused(found[0], rec)

    def refused(self, tpl, rec: Record) -> str | None:
        """Knobs the template itself refuses for the record's workload on its arch (`check()`):
        no tuner stores such a record, and a build from it would not compile."""
        if rec.arch not in self._targets:
            from ..errors import UserError
            from ..tuner.targets import get_arch, target_of

            try:
                self._targets[rec.arch] = target_of(get_arch(rec.arch))
            except UserError:
                self._targets[rec.arch] = None
        target = self._targets[rec.arch]
        if target is None:   # another machine's CPU, say: nothing here to check it against
            return None
        try:
            why = tpl.check(rec.workload, rec.knobs, target)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:   # a workload missing a field
            why = f"{type(e).__name__}: {e}"
        return f"{rec.template} refuses knobs {canonical(rec.knobs)} for {canonical(rec.workload)} on {rec.arch}: {why}" \
            if why else None
