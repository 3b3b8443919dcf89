"""`shardtune db refresh`: carry records across template edits that leave the kernel as it was.

A record names the template version (a hash of its source and knob space) that made it, so any
edit of a template file makes every record of it stale, even a refactor, or a new knob whose first
value is the old behaviour (the convention here). Refresh rebuilds each record made stale only by
that, with the current template, its knobs completed by the first value of every knob added since,
and compares the generated code with the hash the record stored (`source_sha`, tuner.measure).
The same code is the same kernel, so the measurement still holds: a copy of the record is stored
under the current version, saying which version measured it (`extra.refreshed_from`). The old
record stays.
Anything else (code that changed, knobs the space dropped or `check()` now refuses, another TVM,
no stored code hash) stays stale: it needs a retune."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from ..database.records import canonical
from ..errors import UserError

REFRESHED = "refreshed"


@dataclass
class Outcome:
    record: object          # the stale Record
    verdict: str            # "refreshed", "code changed", "not refreshable", "build failed"
    note: str = ""
    new: object = None      # the refreshed Record


def plan(records, validator, present: set = frozenset()) -> list[Outcome]:
    """An Outcome per stale record not refreshed before (its copy's id in `present`); those that
    can be refreshed carry the new record (not yet checked against the generated code)."""
    from ..database.checks import record_id
    from .search import completed_knobs
    from .targets import get_arch, target_of

    targets, out = {}, []
    for rec in records:
        reason = validator.reason(rec)
        if reason is None:
            continue
        found = validator.template(rec.template)
        if found is None or rec.template_hash == found[1]:
            out.append(Outcome(rec, "not refreshable", reason))
            continue
        if not rec.source_sha:
            out.append(Outcome(rec, "not refreshable", "the record stored no hash of its code"))
            continue
        tpl, current = found
        try:
            if rec.arch not in targets:
                targets[rec.arch] = target_of(get_arch(rec.arch))
        except UserError as e:
            out.append(Outcome(rec, "not refreshable", f"cannot build for {rec.arch}: {e}"))
            continue
        try:
            knobs = completed_knobs(tpl, rec.knobs, targets[rec.arch])
        except ValueError as e:   # KnobError: knobs the space dropped
            out.append(Outcome(rec, "not refreshable", str(e)))
            continue
        why = tpl.check(rec.workload, knobs, targets[rec.arch])
        if why:
            out.append(Outcome(rec, "not refreshable", why))
            continue
        # The version that measured it, however many refreshes ago.
        extra = {**rec.extra, "refreshed_from": rec.extra.get("refreshed_from", rec.template_hash)}
        new = dataclasses.replace(rec, template_hash=current, knobs=knobs, extra=extra)
        if record_id(new) in present:
            continue
        still = validator.reason(new)   # e.g. another TVM version, numerics above a tightened tolerance
        if still:
            out.append(Outcome(rec, "not refreshable", still))
            continue
        out.append(Outcome(rec, REFRESHED, "", new))
    return out


def refresh(db, arch: str | None = None, builders: int | None = None, progress: bool = True) -> list[Outcome]:
    """Refresh the stale records of `db` (an open, writable TuningDB) where the current template
    generates the very code they were measured with; returns an Outcome per stale record."""
    from tqdm import tqdm

    from ..database.checks import Validator
    from .measure import Bench
    from .targets import get_arch

    present = {row[0] for row in db.conn.execute("SELECT id FROM records")}
    outcomes = plan(db.records(arch=arch), Validator(), present)
    todo = [o for o in outcomes if o.verdict == REFRESHED]
    # One build per distinct kernel: a run stores several records of the same knobs.
    jobs: dict[tuple, list[Outcome]] = {}
    for o in todo:
        n = o.new
        jobs.setdefault((n.arch, n.template, canonical(n.workload), canonical(n.knobs)), []).append(o)
    by_arch: dict[str, list[tuple]] = {}
    for key in jobs:
        by_arch.setdefault(key[0], []).append(key)
    bar = tqdm(total=len(jobs), desc="rebuilding", unit="kernel", disable=not progress)
    for a, keys in sorted(by_arch.items()):
        bench = Bench(get_arch(a).target, None, builders=builders)
        try:
            for start in range(0, len(keys), 16):   # in chunks, so the bar moves
                chunk = keys[start:start + 16]
                built = bench.build_each([(jobs[k][0].new.template, jobs[k][0].new.workload, jobs[k][0].new.knobs)
                                          for k in chunk])
                for key, (path, err) in zip(chunk, built):
                    for o in jobs[key]:
                        if path is None:
                            o.verdict, o.note, o.new = "build failed", err, None
                        elif bench.source_sha[path] != o.record.source_sha:
                            o.verdict, o.note, o.new = "code changed", "retune", None
                bar.update(len(chunk))
        finally:
            bench.close()
    bar.close()
    fresh = [o.new for o in outcomes if o.verdict == REFRESHED]
    if fresh:
        db.add_many(fresh)
    return outcomes


def summary(outcomes: list[Outcome]) -> list[tuple]:
    """(template, arch, refreshed, code changed, other) rows, and a total row."""
    counts: dict[tuple, Counter] = {}
    for o in outcomes:
        counts.setdefault((o.record.template, o.record.arch), Counter())[o.verdict] += 1
    rows = [(t, a, c[REFRESHED], c["code changed"], c["not refreshable"] + c["build failed"])
            for (t, a), c in sorted(counts.items())]
    total = Counter(o.verdict for o in outcomes)
    rows.append(("all", "", total[REFRESHED], total["code changed"], total["not refreshable"] + total["build failed"]))
    return rows
