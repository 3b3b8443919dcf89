"""Shared test fixtures. The database tests need a template whose knob space they
control: `db_template` registers a small real one for the test and removes it after,
so other tests' template lists never see it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `python -m pytest` in the checkout puts the checkout on sys.path, and its kernels/ folder would then
# shadow Hugging Face's `kernels` package, which transformers 5 imports (ImportError: cannot import
# name 'CUDAProperties' from 'kernels'). The tests import this project as shardtune.* only.
CHECKOUT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != CHECKOUT]

from shardtune import kernels
from shardtune.kernels import Template


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes longer than the rest of its suite together")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that needs AMD code generation skips where its toolchain is missing (Debian's
    rocm-device-libs and lld-22, which .ci/run installs): the one-line error says what to install."""
    outcome = yield
    report = outcome.get_result()
    exc = call.excinfo
    if exc is not None and exc.typename == "UserError" and str(exc.value).startswith("AMD code generation needs"):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {exc.value}")


class DbTestTemplate(Template):
    """Only the name, knob space, tolerance and source hash matter to the database."""

    name = "dbtest_gemv"
    gpu_knobs = {"rows": [1, 2, 4], "vec": [1, 2]}
    knob_space = gpu_knobs  # the whole declared space (this template has no CPU knobs)
    tolerance = 1e-3


@pytest.fixture
def db_template():
    kernels.register(DbTestTemplate)
    yield kernels.get_template(DbTestTemplate.name)
    kernels._REGISTRY.pop(DbTestTemplate.name, None)


@pytest.fixture
def make_record(db_template):
    """record(**overrides) -> a Record valid here (current hash, knobs in space, this TVM)."""
    from shardtune.database import Record
    from shardtune.database.checks import installed_tvm_version

    def make(**overrides):
        fields = dict(
            template=db_template.name, template_hash=db_template.source_hash,
            workload={"N": 256, "K": 512, "batch": 1}, arch="sm_90", shards=1,
            device="test GPU", compute_units=132, knobs={"rows": 2, "vec": 1},
            latency_us=10.0, latency_spread_us=0.2, runs=50, bandwidth_gbps=100.0,
            max_rel_error=1e-4, trials=8, tvm_version=installed_tvm_version(),
            created_at="2026-11-26T12:00:00Z",
        )
        fields.update(overrides)
        return Record(**fields)

    return make


@pytest.fixture
def rank_reference():
    """rank_reference(partials, residual, weight, rank) -> (y, h) of the fused all-reduce on rank
    `rank` of N: the template's reference on the inputs as that rank sees them, the peers' partials
    in its rank-relative order (in both slots, so the round does not matter)."""
    import numpy as np

    tpl = kernels.get_template("allreduce_add_norm")

    def reference(partials, residual, weight, rank):
        n, H = len(partials), residual.shape[-1]
        comm = [np.stack([partials[(rank + p) % n]] * 2) for p in range(n)]
        flags = [np.zeros(n, np.int32) for _ in range(n)]
        lines = [np.zeros((2, n, H // 2, 2), np.int32) for _ in range(n)]
        out = [np.zeros((1, H), np.float16)] * 2
        y, h = tpl.reference([partials[rank][None], residual, weight, *comm, *flags, *lines, *out])
        return y[0], h[0]
    return reference
