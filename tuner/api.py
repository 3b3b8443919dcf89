"""`shardtune.tune(...)`: tune every kernel of a model for an arch and shard count,
store the results in the tuning database, and return the records stored."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import socket
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from ..errors import UserError
from ..kernels import get_template
from .measure import Bench, Measurement, _one_line
from .search import completed_knobs, open_study, search, study_name
from .targets import get_arch, local_gpu_arch, target_of
from .workloads import kernel_instances

KEEP_PER_KEY = 3   # the best few distinct candidates of a run go to the database (top-k queries)


@dataclass
class Row:
    """One line of the closing table."""
    template: str
    shape: str
    best_us: float
    gbps: float
    pct_copy: float
    baseline_us: float
    trials: int
    status: str


def parse_duration(text: str | float | None) -> float | None:
    """'10m', '90s', '1h', '600' -> seconds."""
    if text is None or isinstance(text, (int, float)):
        return text
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise UserError(f"--time-budget {text!r}: use a number of seconds or e.g. 90s, 10m, 1h") from None


def _without_records(instances, store, arch: str, shards: int, device: str, out) -> list:
    have = [inst for inst in instances
            if getattr(store.best_for(inst.template, inst.workload, arch, shards, device)[0], "device", None) == device]
    if have:
        print(f"{len(have)} of {len(instances)} kernels already have a record from {device}: skipped",
              file=out)
    return [inst for inst in instances if inst not in have]


def _device_description(device_type: str, remote: dict | None = None) -> dict:
    """The provenance fields of a record that describe where it was measured:
    here, or on an RPC server (`remote` is what remote.describe found there)."""
    import tvm
    import tvm_ffi

    from .. import __version__

    common = {"tvm_version": tvm.__version__, "tvm_ffi_version": tvm_ffi.__version__,
              "shardtune_version": __version__, "host": socket.gethostname()}
    if remote is not None:
        return {**common, **{k: remote[k] for k in ("device", "compute_units", "runtime_version", "host")}}
    if device_type == "cpu":
        name = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return {"device": name, "compute_units": os.cpu_count() or 1, "runtime_version": platform.release(),
                **common}
    dev = tvm.runtime.device(device_type, 0)
    return {"device": dev.device_name, "compute_units": dev.multi_processor_count,
            "runtime_version": str(dev.driver_version or dev.api_version or ""), **common}


def _record(tpl, inst, arch: str, shards: int, device: dict, on_gpu: bool, trial, res, baseline,
            copy_gbps: float, where: dict):
    from ..database import Record

    m = trial.m
    return Record(
        template=tpl.name, template_hash=tpl.source_hash, workload=inst.workload, arch=arch, shards=shards,
        knobs=trial.knobs, latency_us=m.latency_us, latency_spread_us=m.spread_us, runs=m.runs,
        bandwidth_gbps=tpl.bytes_moved(inst.workload) / (m.latency_us * 1e-6) / 1e9,
        max_rel_error=m.rel_error, status="complete" if res.complete else "partial", trials=res.spent,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=_command_line(), source_sha=m.source_sha, **device,
        extra={"baseline_us": baseline.latency_us if baseline.ok else None,
               "baseline": "dlight" if on_gpu and tpl.dlight_baseline else "default knobs",
               "copy_gbps": copy_gbps, "layers": list(inst.layers), "timing": m.timing, **where},
    )


# On one H100, 128 a kernel tuned Llama-2-70B TP2's GEMVs in 336 s (issue 3 allows 10 minutes), each
# within 3.4% of four times as many; at 48, two were 5-6% behind. A CPU candidate takes seconds to
# measure, so the CPU default stays short.
DEFAULT_TRIALS = {"cpu": 48, "nvidia": 128, "amd": 128}

LAUNCH_BYTES = 9 << 20   # what a kernel's fixed ~3 us would move at ~3 TB/s: tiny kernels still cost that


def budget_shares(instances) -> list[float]:
    """Each kernel's share of a time budget: its part of a decode step's time, estimated as bytes
    moved (plus a launch's worth) times calls per step, so the search time goes where the step's
    time goes; no kernel gets under a third of an even share."""
    from ..kernels import get_template

    cost = [max(1, inst.calls_per_token) * (get_template(inst.template).bytes_moved(inst.workload) + LAUNCH_BYTES)
            for inst in instances]
    floor = sum(cost) / len(cost) / 3
    return [max(c, floor) for c in cost]


def tune(arch: str, shards: int, model: str, db: str | None = None, trials_per_kernel: int | None = None,
         time_budget: float | str | None = None, seed: int = 0, kernels: list[str] | None = None,
         dry_run: bool = False, builders: int | None = None, batch: int = 1, quant: str = "q4f16_1",
         progress: bool = True, out=sys.stdout, rpc_tracker: str | None = None, rpc_key: str | None = None,
         rpc_workers: int | None = None, missing_only: bool = False) -> list:
    """Tune, store, print a table; returns the Records stored (empty on a dry run).
    `trials_per_kernel` defaults to DEFAULT_TRIALS of the arch's vendor.
    With `missing_only`, kernels that already have a current record measured on this device (at
    any shard count: a build takes those too) are left out, so a run fills the database's gaps.
    With `rpc_tracker` ("host:port") and `rpc_key`, candidates are measured on the devices
    registered with that TVM RPC tracker under that key, `rpc_workers` at a time
    (default: as many as the tracker has free servers)."""
    from ..database import TuningDB, default_db_path
    from ..database.records import canonical

    a = get_arch(arch)
    if trials_per_kernel is None:
        trials_per_kernel = DEFAULT_TRIALS[a.vendor]
    instances = kernel_instances(model, shards, kernels, batch=batch, quant=quant)
    if a.vendor == "amd" and any(inst.template == "q4f16_1_gemm" for inst in instances):
        raise UserError("--kernels gemm has tensor-core (wmma) schedules for NVIDIA only; "
                        f"{a.name} builds give prefill's GEMMs dlight's Matmul")
    budget = parse_duration(time_budget)
    device_type = {"cpu": "cpu", "nvidia": "cuda", "amd": "rocm"}[a.vendor]
    remote = where = None
    if rpc_tracker or rpc_key or rpc_workers is not None:
        remote, where, a = _connect_remote(a, device_type, rpc_tracker, rpc_key, rpc_workers, dry_run)
    elif a.vendor != "cpu":
        local = local_gpu_arch()
        if local != a.name and not dry_run:
            raise UserError(f"--arch {a.name} needs a local {a.name} GPU to measure on, and this machine has "
                            f"{local or 'none'}: pass --rpc-tracker HOST:PORT --rpc-key KEY to measure on "
                            "remote ones, or --dry-run to build the candidates only")
    target = target_of(a)
    bench = Bench(a.target, None if dry_run else device_type, builders=builders, remote=remote)
    try:
        if dry_run:
            return _dry_run(instances, target, bench, trials_per_kernel, seed, out)
        # Remote: a device that fails at once stops the run before the database is touched.
        copy_gbps = _remote_copy_bandwidth(bench, remote) if remote else None
        db_path = str(db or default_db_path())
        store = TuningDB(db_path)
        if copy_gbps is None:
            copy_gbps = bench.copy_bandwidth()
        on_gpu = device_type != "cpu"
        if on_gpu:
            # A GPU kernel faster than a device copy was timed warm. On CPUs the copy is one
            # thread's memcpy and small kernels live in a cache of hundreds of MB: no such ceiling.
            bench.ceiling_gbps = copy_gbps
        device = _device_description(device_type, where)
        if missing_only:
            instances = _without_records(instances, store, a.name, shards, device["device"], out)
            if not instances:
                return []
        studies = os.path.splitext(db_path)[0] + ".studies.db"
        start = time.monotonic()
        total = trials_per_kernel * len(instances)
        bar = _progress(total, progress)
        stored, rows = [], []
        shares = budget_shares(instances)
        for i, inst in enumerate(instances):
            tpl = get_template(inst.template)
            left = None if budget is None else budget - (time.monotonic() - start)
            deadline = (float("inf") if left is None
                        else time.monotonic() + max(0.0, left) * shares[i] / sum(shares[i:]))
            wl_key = canonical(inst.workload)
            study = open_study(studies, study_name(tpl, wl_key, a.name, shards), seed)
            warm = _warm_knobs(store, tpl, inst.workload, a.name, target)
            bar.set_description(f"{tpl.name} {shape_text(inst.workload)}")
            before = bar.n
            res = search(tpl, inst.workload, target, study, bench, trials_per_kernel, deadline, warm,
                         seed, on_trial=lambda: bar.update(1),
                         builds_per_round=max(min(8, max(2, bench.n_builders)), bench.n_runners))
            bar.update(max(0, before + trials_per_kernel - bar.n))
            best = res.best(KEEP_PER_KEY)
            baseline = _baseline(bench, tpl, inst.workload, target, a.vendor, res)
            shape = shape_text(inst.workload)
            if not best:
                rows.append(Row(tpl.name, shape, float("nan"), float("nan"), float("nan"),
                                baseline.latency_us, res.spent, "no valid candidate"))
                continue
            # Remote: which tracker, key and servers measured (`device` was described by one of them).
            rpc = {} if remote is None else {"rpc": {"tracker": remote.tracker, "key": remote.key,
                                                     "servers": sorted(bench.servers)}}
            recs = [_record(tpl, inst, a.name, shards, device, on_gpu, t, res, baseline, copy_gbps, rpc)
                    for t in best]
            store.add_many(recs)
            stored += recs
            top = recs[0]
            # A template whose time is round trips, not bytes (bandwidth_bound = False), shows no share.
            bound = getattr(tpl, "bandwidth_bound", True)   # not on the base class: it would stale every record
            pct = 100 * top.bandwidth_gbps / copy_gbps if on_gpu and bound else float("nan")
            rows.append(Row(tpl.name, shape, top.latency_us, top.bandwidth_gbps, pct,
                            baseline.latency_us, res.spent, top.status))
        bar.close()
        print_table(rows, a.name, shards, device["device"], on_gpu, copy_gbps, out)
        if bench.lost:
            print(bench.lost_summary(), file=out)
        return stored
    finally:
        bench.close()


def _connect_remote(a, device_type: str, tracker: str | None, key: str | None, workers: int | None,
                    dry_run: bool):
    """Check the tracker and its servers before anything is built or written; returns the
    RemoteConfig, what describe() found, and the arch (for CPUs: the remote CPU's target)."""
    from .remote import connect, describe

    if dry_run:
        raise UserError("--dry-run measures nothing: drop --rpc-tracker/--rpc-key")
    if not (tracker and key):
        raise UserError("--rpc-tracker HOST:PORT and --rpc-key KEY go together")
    remote = connect(tracker, key, device_type, workers)
    where = describe(remote, a)
    if where["arch"] != a.name and device_type == "cpu":
        # Builds link with this machine's tools: no cross-linking to another CPU architecture.
        raise UserError(f"the servers under key {key!r} are {where['arch']} CPUs and this machine "
                        f"({a.name}) cannot build for them")
    if where["arch"] != a.name:
        raise UserError(f"--arch {a.name}: the servers under key {key!r} have {where['device']} "
                        f"({where['arch']}); tune for that arch or use another key")
    if device_type == "cpu" and where.get("mcpu"):
        # Build for the remote CPU, not this one: same machine type, perhaps another model.
        a = replace(a, target={**a.target, "mcpu": where["mcpu"], "num-cores": where["cores"]})
    return remote, where, a


def _remote_copy_bandwidth(bench: Bench, remote) -> float:
    try:
        return bench.copy_bandwidth()
    except Exception as e:  # noqa: BLE001 - the first measurement on the servers: say why in one line
        raise UserError(f"could not measure on {remote.key!r} at {remote.tracker}: {_one_line(e)}") from None


def shape_text(wl: dict) -> str:
    """2048x4096 for a GEMV (N x K), 2048x4096 M=16 for a prefill GEMM of 16 tokens, H=8192 for a
    norm, 32/4x128 L=1024 for attention (query/KV heads x head dim, context length); b2 for batch 2."""
    if "q_heads" in wl:
        text = f"{wl['q_heads']}/{wl['kv_heads']}x{wl['head_dim']}" + (f" L={wl['length']}" if "length" in wl else "")
    else:
        text = (f"{wl['N']}x{wl['K']}" if "N" in wl else f"H={wl['H']}") + (f" M={wl['M']}" if "M" in wl else "")
    return text + (f" b{wl['batch']}" if wl.get("batch", 1) > 1 else "")


def _command_line() -> str:
    """How this process was started, as a user would type it (`python -m shardtune` -> shardtune)."""
    prog = os.path.basename(sys.argv[0])
    prog = "shardtune" if prog == "__main__.py" else prog
    return " ".join(shlex.quote(x) for x in [prog, *sys.argv[1:]])


OWN_WARM = 2   # of a search's warm start, at most this many from the workload's own records


def _shape_distance(a: dict, b: dict) -> float:
    """How far apart two workloads of one template are: summed |log2| ratios of their sizes."""
    return sum(abs(math.log2(a[k] / b[k])) for k in a
               if type(a[k]) is int and type(b.get(k)) is int and a[k] > 0 and b[k] > 0)


def _warm_knobs(store, tpl, wl, arch, target, limit: int = 4) -> list[dict]:
    """Knobs that won for the same template and arch (stale records too: a hint is a hint): this
    workload's fastest first, at most OWN_WARM of them, then the fastest of each other workload,
    nearest shape first. Replayed on H100 GEMV spaces measured whole (benchmarks/search_replay.py),
    searches of 32 trials that started from a shape's record and three other shapes' winners ended
    more than 2% from the space's best 9 times in 100; from the record alone, 19 times. A knob
    added to the template since takes its first listed value, the schedule as it was before the
    knob existed; knobs outside today's space are dropped."""
    own, others = [], {}
    for rec in sorted(store.records(arch=arch, template=tpl.name), key=lambda r: r.latency_us):
        if rec.workload == wl:
            own.append(rec)
        else:   # the first seen of a workload is its fastest
            others.setdefault(json.dumps(rec.workload, sort_keys=True), rec)
    nearest = sorted(others.values(), key=lambda r: _shape_distance(wl, r.workload))
    out = []
    for rec in [*own[:OWN_WARM], *nearest, *own[OWN_WARM:]]:
        try:
            knobs = completed_knobs(tpl, rec.knobs, target)   # before check(), which may index any knob
        except ValueError:
            continue
        if knobs not in out and tpl.check(wl, knobs, target) is None:
            out.append(knobs)
    return out[:limit]


def _baseline(bench: Bench, tpl, wl, target, vendor, res) -> Measurement:
    """What a tuned record must beat: dlight's schedule on GPUs, the default knobs on CPUs and
    for kernels dlight cannot schedule (measured as the search's first trial where it was one:
    the same run, so the same conditions)."""
    dlight = vendor != "cpu" and tpl.dlight_baseline
    knobs = None if dlight else tpl.default_knobs(wl, target)
    for t in res.trials:
        if knobs is not None and t.knobs == knobs and t.m.ok:
            return t.m
    path, err = bench.build_many(tpl.name, wl, [knobs])[0]
    return Measurement(error=err) if path is None else bench.measure(path, tpl.name, wl)


def _dry_run(instances, target, bench, trials, seed, out) -> list:
    """Build candidates for every instance without measuring; report what built."""
    rng = np.random.default_rng(seed)
    print(f"dry run: building up to {trials} candidates per kernel for {target.kind.name} "
          f"({target.attrs.get('arch') or target.attrs.get('mcpu') or ''}); nothing is measured or stored",
          file=out)
    failures = 0
    for inst in instances:
        tpl = get_template(inst.template)
        cands = tpl.sample_knobs(inst.workload, target, rng, trials,
                                 first=[tpl.default_knobs(inst.workload, target)])
        built = bench.build_many(tpl.name, inst.workload, cands)
        bad = [e for p, e in built if p is None]
        failures += len(bad)
        print(f"  {tpl.name} {shape_text(inst.workload)}: {len(built) - len(bad)}/{len(built)} built"
              + (f" (first failure: {bad[0]})" if bad else ""), file=out)
    if failures:
        raise UserError(f"{failures} candidate(s) failed to build")
    return []


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="trial", disable=not enabled, leave=False, dynamic_ncols=True)


def print_table(rows: list[Row], arch: str, shards: int, device: str, on_gpu: bool, copy_gbps: float,
                out) -> None:
    what = "device copy" if on_gpu else "one-thread memcpy; no ceiling for cache-resident CPU kernels"
    print(f"\n{device} ({arch}), {shards} shard(s); copy bandwidth {copy_gbps:.0f} GB/s ({what})", file=out)
    head = ["kernel", "shape", "best us", "GB/s", "% copy", "baseline us", "speedup", "trials", "status"]
    body = []
    for r in rows:
        speed = r.baseline_us / r.best_us if r.baseline_us == r.baseline_us and r.best_us == r.best_us else float("nan")
        pct = f"{r.pct_copy:.0f}%" if r.pct_copy == r.pct_copy else "-"
        body.append([r.template, r.shape, f"{r.best_us:.2f}", f"{r.gbps:.0f}", pct,
                     f"{r.baseline_us:.2f}", f"{speed:.2f}x", str(r.trials), r.status])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)] if body else [len(h) for h in head]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths)), file=out)
