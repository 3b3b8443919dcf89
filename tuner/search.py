"""Knob search for one kernel instance: Optuna's TPE proposes, an XGBoost cost
model trained on what was measured so far picks which proposals to build, and
the study lives in SQLite so an interrupted search resumes where it stopped."""
from __future__ import annotations

import contextlib
import fcntl
import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import optuna

from .measure import Bench, Measurement

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Trial:
    knobs: dict
    m: Measurement


@dataclass
class SearchResult:
    trials: list[Trial] = field(default_factory=list)   # measured (this run and earlier ones)
    spent: int = 0                                       # builds attempted, all runs
    complete: bool = False                               # reached the trial budget

    def best(self, k: int = 1) -> list[Trial]:
        ok = sorted((t for t in self.trials if t.m.ok), key=lambda t: t.m.latency_us)
        seen, out = set(), []
        for t in ok:
            key = tuple(sorted(t.knobs.items()))
            if key not in seen:
                seen.add(key)
                out.append(t)
        return out[:k]


def features(knobs: dict, space: dict, wl: dict) -> list[float]:
    """Numbers XGBoost can split on: log2 of numeric knobs, the index of the others."""
    row = [math.log2(v) for _, v in sorted(wl.items()) if isinstance(v, int) and v > 0]
    for name, values in space.items():
        v = knobs[name]
        row.append(math.log2(v) if isinstance(v, (int, float)) and v > 0 else float(values.index(v)))
    return row


class CostModel:
    """Predicts log latency from knobs; ranks proposals once it has seen enough."""

    MIN_POINTS = 8

    def __init__(self, space: dict, seed: int):
        self.space, self.seed, self.model = space, seed, None

    def fit(self, wl: dict, trials: list[Trial]) -> None:
        ok = [t for t in trials if t.m.ok]
        if len(ok) < self.MIN_POINTS:
            return
        import xgboost as xgb

        X = np.array([features(t.knobs, self.space, wl) for t in ok])
        y = np.log([t.m.latency_us for t in ok])
        params = {"max_depth": 4, "eta": 0.2, "seed": self.seed, "nthread": 1, "objective": "reg:squarederror"}
        self.model = xgb.train(params, xgb.DMatrix(X, label=y), num_boost_round=60)

    def rank(self, wl: dict, candidates: list[dict]) -> list[int]:
        """Indices of `candidates`, most promising first (as proposed, before fitting)."""
        if self.model is None or not candidates:
            return list(range(len(candidates)))
        import xgboost as xgb

        pred = self.model.predict(xgb.DMatrix(np.array([features(k, self.space, wl) for k in candidates])))
        return [int(i) for i in np.argsort(pred, kind="stable")]


def study_name(tpl, wl_key: str, arch: str, shards: int) -> str:
    # The template's hash is part of the name: trials of an older template version are not resumed.
    return f"{tpl.name}@{tpl.source_hash}|{wl_key}|{arch}|{shards}"


@contextlib.contextmanager
def _storage_lock(storage_path: str):
    # Several processes may share the file. Creating its tables (Optuna stamps a schema
    # version) or the same study at once races inside Optuna; a lock file serialises that.
    with open(storage_path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def open_storage(storage_path: str) -> optuna.storages.RDBStorage:
    """The Optuna storage beside a tuning database. Writes after opening wait on SQLite's lock."""
    with _storage_lock(storage_path):
        return optuna.storages.RDBStorage(f"sqlite:///{storage_path}",
                                          engine_kwargs={"connect_args": {"timeout": 60}})


def open_study(storage_path: str, name: str, seed: int) -> optuna.Study:
    storage = open_storage(storage_path)
    with _storage_lock(storage_path):
        return optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                   sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=8),
                                   load_if_exists=True)


def _finished(stored: list) -> list[Trial]:
    """The measured trials among a stored study's FrozenTrials."""
    out = []
    for t in stored:
        if t.state == optuna.trial.TrialState.COMPLETE:
            a = t.user_attrs
            # Trials stored before timings were recorded were all timed one launch at a time.
            out.append(Trial(dict(t.params), Measurement(t.value, a["spread_us"], a["runs"], a["rel_error"],
                                                         source_sha=a.get("source_sha", ""),
                                                         timing=a.get("timing", "launch"))))
        elif t.state == optuna.trial.TrialState.FAIL and "error" in t.user_attrs:
            out.append(Trial(dict(t.params), Measurement(error=t.user_attrs["error"])))
    return out


def _working_copy(study: optuna.Study, stored: list) -> optuna.Study:
    """An in-memory study holding the stored one's finished trials, for TPE to ask and be told.
    On the SQLite storage every ask and tell reads the whole study: about 60 ms each at first,
    growing with the study, and a round asks 16. Only measured trials are written back."""
    mem = optuna.create_study(direction="minimize", sampler=study.sampler)
    mem.add_trials([t for t in stored if t.state.is_finished()])
    return mem


class _Round(NamedTuple):
    """One round's candidates, their Optuna trials (None: measured first, not asked), which of them
    are built, and the builds submitted for those."""
    cands: list
    asked: list
    take: list
    futures: list


LATE_ROUND = 2   # candidates built for a kernel whose share of the time budget is already spent


def completed_knobs(tpl, knobs: dict, target) -> dict:
    """`knobs` with every knob of the target's space: a knob added to the template since takes its
    first listed value, which is the schedule as it was before the knob existed. KnobError (a
    ValueError) for knobs or values outside today's space."""
    out = {name: values[0] for name, values in tpl.space_for(target).items()}
    out.update(knobs)
    tpl.validate_knobs(out)
    return out


def neighbours(knobs: dict, space: dict) -> list[dict]:
    """The settings one knob away from `knobs`, knob by knob in the space's order."""
    return [{**knobs, name: v} for name, values in space.items() for v in values if v != knobs.get(name)]


def seed_knobs(tpl, wl: dict, target) -> list[dict]:
    """Settings a template names as worth measuring early (its optional `seed_knobs`), beside
    the default and the warm start: ones a random draw would seldom hit."""
    return getattr(tpl, "seed_knobs", lambda wl, target: [])(wl, target)


def search(tpl, wl: dict, target, study: optuna.Study, bench: Bench, trials: int, deadline: float,
           warm_knobs: list[dict], seed: int, on_trial=lambda: None, builds_per_round: int = 4,
           proposals: int | None = None) -> SearchResult:
    # TPE proposes twice what a round builds and the cost model picks the better half. More made
    # no difference in replays (benchmarks/search_replay.py), and every proposal left unbuilt stays
    # in TPE's history, slowing each later ask. With 2 builders, 16 proposals a round (as before)
    # took `tune --arch cpu --model tiny` 36 s at the median of 4 runs, 4 took 33.
    proposals = proposals or 2 * builds_per_round
    space = tpl.space_for(target)
    dists = {k: optuna.distributions.CategoricalDistribution(v) for k, v in space.items()}
    stored = study.get_trials(deepcopy=False)   # read once: the search's start and TPE's copy
    res = SearchResult(trials=_finished(stored))
    proposer = _working_copy(study, stored)
    res.spent = len(res.trials)
    tried = {tuple(sorted(t.knobs.items())) for t in res.trials}
    # Measured first, whatever the cost model thinks: the default, the warm start, the template's
    # seeds, then the settings one knob away from the best warm start (TPE seldom refines a good
    # start, and a knob added to a template is explored from the settings that won without it).
    first = []
    start = neighbours(warm_knobs[0], space) if warm_knobs else []
    for knobs in [tpl.default_knobs(wl, target), *warm_knobs, *seed_knobs(tpl, wl, target), *start]:
        if knobs not in first and tuple(sorted(knobs.items())) not in tried and tpl.check(wl, knobs, target) is None:
            first.append(knobs)
    model = CostModel(space, seed)
    stale_rounds = late_rounds = 0
    # Overlapped (Bench.overlap_builds), the next round builds while this one is measured: TPE and
    # the cost model then propose without the latest round's times, and the GPU need not wait on builds.
    overlap = getattr(bench, "overlap_builds", False)
    building = None   # a round submitted to the builders, not yet measured

    def finish(rnd: _Round) -> None:
        cands, asked, take, futures = rnd
        built = bench.collect_builds(futures)
        # Measured together: with several (remote) devices, in parallel.
        ok = [path for path, _ in built if path is not None]
        measured = iter(bench.measure_many([(path, tpl.name, wl) for path in ok]))
        for i, (path, err) in zip(take, built):
            m = Measurement(error=err) if path is None else next(measured)
            if path is not None:
                m.source_sha = bench.source_sha.pop(path, "")
            attrs = ({"spread_us": m.spread_us, "runs": m.runs, "rel_error": m.rel_error,
                      "source_sha": m.source_sha, "timing": m.timing} if m.ok else {"error": m.error})
            state = optuna.trial.TrialState.COMPLETE if m.ok else optuna.trial.TrialState.FAIL
            done = optuna.trial.create_trial(params=cands[i], distributions=dists, state=state,
                                             value=m.latency_us if m.ok else None, user_attrs=attrs)
            study.add_trial(done)   # stored whole: a `tune` sharing the study never sees it half-told
            if asked[i] is None:
                proposer.add_trial(done)
            else:
                proposer.tell(asked[i], done.value, state=state)
            res.trials.append(Trial(cands[i], m))
            res.spent += 1
            on_trial()

    while stale_rounds < 20:
        left = trials - res.spent - (len(building.take) if building else 0)
        out_of_time = time.monotonic() >= deadline
        if building and (left <= 0 or out_of_time):
            finish(building)   # what the last round found counts before stopping
            building = None
            continue
        if left <= 0:
            break
        if out_of_time:
            # Out of time. A kernel with nothing valid yet still gets one small round (the budget
            # ran out on the kernels before it): a record beats none by far, and costs seconds.
            if late_rounds or any(t.m.ok for t in res.trials):
                break
            late_rounds += 1
        model.fit(wl, res.trials)
        # The settings measured first are not Optuna trials until measured (then added whole): an
        # enqueued trial could be handed to another `tune` process sharing the study.
        forced, first = first[:builds_per_round], first[builds_per_round:]
        asked, cands = [None] * len(forced), list(forced)
        proposed = {tuple(sorted(k.items())) for k in forced}
        for _ in range(proposals):
            t = proposer.ask(dists)
            key = tuple(sorted(t.params.items()))
            if key in tried or key in proposed or tpl.check(wl, t.params, target):
                # Already measured or building, already proposed this round, or invalid (pruned
                # before any build).
                proposer.tell(t, state=optuna.trial.TrialState.PRUNED)
                continue
            proposed.add(key)
            asked.append(t)
            cands.append(dict(t.params))
        if not cands:
            if building:   # nothing new to build until the round in flight is measured
                finish(building)
                building = None
                continue
            stale_rounds += 1
            continue
        stale_rounds = 0
        order = list(range(len(forced))) + [len(forced) + i for i in model.rank(wl, cands[len(forced):])]
        take = order[:min(LATE_ROUND if late_rounds else builds_per_round, left)]
        for i in order[len(take):]:   # the cost model passed these over: no build
            if asked[i] is None:
                first.insert(0, cands[i])   # a late round's leftover: still first, if time is left
            else:
                proposer.tell(asked[i], state=optuna.trial.TrialState.PRUNED)
        rnd = _Round(cands, asked, take, bench.submit_builds([(tpl.name, wl, cands[i]) for i in take]))
        tried.update(tuple(sorted(cands[i].items())) for i in take)
        if not overlap:
            finish(rnd)
            continue
        if building:
            finish(building)
        building = rnd
    if building:
        finish(building)
    # Stopping because every valid knob setting was tried also completes a search.
    res.complete = res.spent >= trials or stale_rounds >= 20
    return res
