"""The cost model learns from measured trials; the search prunes invalid knobs before building."""
import math

from shardtune.tuner.measure import Measurement
from shardtune.tuner.search import CostModel, SearchResult, Trial, features

SPACE = {"rows": [1, 2, 4, 8], "tx": [8, 16, 32], "x_scope": ["shared", "global"]}
WL = {"batch": 1, "N": 4096, "K": 4096}


def latency(k):  # a made-up cost surface: more rows and tx=16 are faster, "global" a bit slower
    return 100 / k["rows"] + (0 if k["tx"] == 16 else 20) + (5 if k["x_scope"] == "global" else 0)


def test_cost_model_ranks_unseen_candidates_by_learned_cost():
    import itertools

    all_knobs = [dict(zip(SPACE, v)) for v in itertools.product(*SPACE.values())]
    seen, unseen = all_knobs[::2], all_knobs[1::2]
    model = CostModel(SPACE, seed=0)
    model.fit(WL, [Trial(k, Measurement(latency(k), 1.0, 10, 0.0)) for k in seen])
    assert model.model is not None
    order = model.rank(WL, unseen)
    ranked = [latency(unseen[i]) for i in order]
    # The top pick is among the best quarter, the last among the worst half.
    assert ranked[0] <= sorted(ranked)[len(ranked) // 4]
    assert ranked[-1] >= sorted(ranked)[len(ranked) // 2]


def test_cost_model_waits_for_enough_points():
    model = CostModel(SPACE, seed=0)
    model.fit(WL, [Trial({"rows": 1, "tx": 8, "x_scope": "shared"}, Measurement(5.0, 0.1, 10, 0.0))])
    assert model.model is None and model.rank(WL, [{}, {}, {}]) == [0, 1, 2]


def test_features_and_best_skip_failures():
    f = features({"rows": 4, "tx": 16, "x_scope": "global"}, SPACE, WL)
    assert f == [12.0, 12.0, 0.0, 2.0, 4.0, 1.0]   # log2 K, N, batch; knobs
    res = SearchResult(trials=[Trial({"a": 1}, Measurement(error="build: boom")),
                               Trial({"a": 2}, Measurement(3.0, 0.1, 10, 0.0)),
                               Trial({"a": 2}, Measurement(2.5, 0.1, 10, 0.0)),
                               Trial({"a": 3}, Measurement(4.0, 0.1, 10, 0.0))])
    assert [t.knobs["a"] for t in res.best(3)] == [2, 3]
    assert math.isclose(res.best()[0].m.latency_us, 2.5)


class _Space:
    """A template over SPACE whose every setting is valid."""
    name = "made_up"

    def space_for(self, target):
        return SPACE

    def check(self, wl, knobs, target):
        return None

    def default_knobs(self, wl, target):
        return {"rows": 1, "tx": 8, "x_scope": "shared"}


class _Bench:
    """Builds nothing and measures the made-up cost surface. `log` says, in order, which settings
    were submitted to build ("build") and which measured ("measure")."""
    def __init__(self, overlap_builds=False):
        self.overlap_builds, self.measured, self.source_sha, self.log = overlap_builds, [], {}, []
        self.knobs = {}

    def submit_builds(self, jobs):
        paths = []
        for _, _, knobs in jobs:
            paths.append(f"c{len(self.knobs)}")
            self.knobs[paths[-1]] = knobs
            self.log.append(("build", knobs))
        return paths

    def collect_builds(self, paths):
        return [(p, "") for p in paths]

    def measure_many(self, jobs):
        knobs = [self.knobs[path] for path, _, _ in jobs]
        self.measured += knobs
        self.log += [("measure", k) for k in knobs]
        return [Measurement(latency(k), 0.1, 10, 0.0) for k in knobs]


def test_search_measures_the_warm_start_then_its_neighbours_first():
    import optuna

    from shardtune.tuner.search import neighbours, search

    start = {"rows": 4, "tx": 16, "x_scope": "global"}
    near = neighbours(start, SPACE)
    assert near[0] == {"rows": 1, "tx": 16, "x_scope": "global"} and len(near) == 3 + 2 + 1
    bench = _Bench()
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    res = search(_Space(), WL, None, study, bench, trials=10, deadline=math.inf,
                 warm_knobs=[start], seed=0, builds_per_round=3)
    # Three a round, in this order: the cost model, once it can rank, passes none of them over.
    assert bench.measured[:8] == [_Space().default_knobs(WL, None), start, *near]
    assert res.best()[0].m.latency_us == min(latency(k) for k in bench.measured) and res.spent == 10
    # In the study as whole trials, with what the search reads back from it.
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 10


def test_search_builds_the_next_round_while_one_is_measured():
    """With a GPU measuring, round k + 1 is submitted to the builders before round k is measured,
    and the search still measures exactly its trial budget, each setting once."""
    import optuna

    from shardtune.tuner.search import search

    bench = _Bench(overlap_builds=True)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    res = search(_Space(), WL, None, study, bench, trials=11, deadline=math.inf,
                 warm_knobs=[{"rows": 4, "tx": 16, "x_scope": "global"}], seed=0, builds_per_round=3)
    steps = [step for step, _ in bench.log]
    assert steps[:9] == ["build"] * 6 + ["measure"] * 3   # round 2 built before round 1 measured
    assert steps.count("build") == steps.count("measure") == 11 == res.spent
    assert len({tuple(sorted(k.items())) for k in bench.measured}) == 11
    assert res.complete and len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 11


def test_overlapped_search_past_its_deadline_measures_one_small_round():
    import optuna

    from shardtune.tuner.search import LATE_ROUND, search

    bench = _Bench(overlap_builds=True)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    res = search(_Space(), WL, None, study, bench, trials=10, deadline=0.0, warm_knobs=[], seed=0,
                 builds_per_round=3)
    assert res.spent == len(bench.measured) == LATE_ROUND and not res.complete


def test_builds_overlap_measurements_only_when_asked_and_never_on_the_measured_cpu(monkeypatch):
    from shardtune.tuner.measure import Bench
    from shardtune.tuner.targets import get_arch

    cpu, gpu = Bench(get_arch("cpu").target, "cpu", builders=1), Bench(get_arch("sm_90").target, "cuda", builders=1)
    try:
        assert not gpu.overlap_builds   # the default until a GPU run measures what it gains
        monkeypatch.setenv("SHARDTUNE_OVERLAP", "1")
        assert gpu.overlap_builds and not cpu.overlap_builds
    finally:
        cpu.close()
        gpu.close()
