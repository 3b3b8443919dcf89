"""On a GPU: tuned candidates, the default knobs and the dlight baseline all match
the NumPy reference, measure below the copy bandwidth, and a short tune stores records."""
import numpy as np
import pytest
import tvm

import shardtune
from shardtune.database import TuningDB
from shardtune.kernels import all_templates, get_template
from shardtune.tuner.measure import Bench
from shardtune.tuner.targets import get_arch, local_gpu_arch


@pytest.mark.parametrize("name", sorted(all_templates()))
def test_candidates_match_reference_and_stay_under_copy_bandwidth(name):
    arch = get_arch(local_gpu_arch())
    target = tvm.target.Target(arch.target)
    tpl = get_template(name)
    bench = Bench(arch.target, "cuda")
    try:
        copy = bench.copy_bandwidth()
        bench.ceiling_gbps = copy
        rng = np.random.default_rng(0)
        shapes = [(1, 4096, 4096), (4, 1024, 11008), (2, 2048, 5504)]
        for wl in ({"batch": b, "H": k} if "norm" in name else {"batch": b, "N": n, "K": k, "quant": "q4f16_1"}
                   for b, n, k in shapes):
            cands = [None, *tpl.sample_knobs(wl, target, rng, 5, first=[tpl.default_knobs(wl, target)])]
            assert len(cands) == 6
            for (path, err), knobs in zip(bench.build_many(tpl.name, wl, cands), cands):
                assert path, err
                m = bench.measure(path, tpl.name, wl)
                assert m.ok, (knobs, m.error)
                assert m.rel_error < tpl.tolerance
    finally:
        bench.close()


def test_short_gpu_tune_stores_records(tmp_path):
    db = tmp_path / "gpu.db"
    recs = shardtune.tune(arch=local_gpu_arch(), shards=1, model="tiny", db=str(db), trials_per_kernel=4,
                          progress=False)
    assert recs and all(r.arch == local_gpu_arch() and r.extra["baseline_us"] for r in recs)
    assert len(TuningDB.open_existing(db)) == len(recs)
