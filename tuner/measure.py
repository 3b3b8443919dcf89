"""Build candidates in parallel worker processes; measure each one in a separate
process with a timeout, with a cold cache, after checking it against the NumPy
reference. A candidate that fails to build, hangs or crashes costs one trial."""
from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np

# Rotate through enough copies of the inputs that each call finds them evicted
# from the last-level cache (H100: 50 MB of L2; CPUs: tens of MB of L3).
MIN_ROTATION_BYTES = 128 << 20
MAX_COPIES = 256


@dataclass
class Measurement:
    latency_us: float = float("nan")   # median
    spread_us: float = float("nan")    # interquartile range
    runs: int = 0
    rel_error: float = float("nan")
    error: str = ""                    # why it failed; empty when it succeeded

    @property
    def ok(self) -> bool:
        return not self.error


def build(template_name: str, wl: dict, knobs: dict | None, target_json: dict, path: str) -> str:
    """Compile one candidate (knobs None: TVM's dlight rules) into a shared library at `path`."""
    import tvm

    from ..kernels import get_template

    tpl = get_template(template_name)
    target = tvm.target.Target(target_json)
    mod = tpl.schedule(wl, knobs, target) if knobs is not None else dlight_module(tpl, wl, target)
    with target:  # nvcc takes -arch from the current target
        ex = tvm.compile(mod, target=target)
    ex.export_library(path)
    return path


def dlight_module(tpl, wl, target):
    """The template's compute scheduled by TVM's own dlight GPU rules: the baseline."""
    import tvm
    from tvm.s_tir import dlight as dl

    mod = tvm.IRModule({"main": tpl.compute(wl)})
    with target:
        try:
            return dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
                                           dl.gpu.Fallback())(mod)
        except Exception:  # noqa: BLE001 - dlight raises assorted errors on patterns it half-knows
            # Its GEMV and Reduction rules assert on the SiLU(gate) * up epilogue.
            return dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)


def measure(path: str, template_name: str, wl: dict, device_type: str, repeat: int = 10,
            seed: int = 0) -> dict:
    """Load a built candidate, check it, then time it with a cold cache. Runs in a worker."""
    import tvm

    from ..kernels import get_template

    tpl = get_template(template_name)
    dev = tvm.runtime.device(device_type, 0)
    mod = tvm.runtime.load_module(path)
    func = mod["main"]
    inputs = tpl.inputs(wl, np.random.default_rng(seed))
    args = [tvm.runtime.tensor(a, device=dev) for a in inputs]
    rel = tpl.relative_error(inputs, lambda n: run_poisoned(func, args, n, dev))
    if not np.isfinite(rel) or rel > tpl.tolerance:
        return {"error": f"numerics: relative error {rel:.3g} > {tpl.tolerance}", "rel_error": rel}

    size = sum(a.nbytes for a in inputs)
    l2 = getattr(dev, "l2_cache_size_bytes", None) or 0
    copies = int(min(MAX_COPIES, max(2, -(-max(MIN_ROTATION_BYTES, 2 * l2) // size))))
    sets = [args] + [[tvm.runtime.tensor(a, device=dev) for a in inputs] for _ in range(copies - 1)]
    timer = mod.time_evaluator("main", dev, number=1, repeat=1)
    for s in sets[:2]:  # warm-up: module load, first-launch costs
        timer(*s)
    times = []
    rounds = max(1, -(-repeat // copies))
    for _ in range(rounds):
        for s in sets:
            times.append(timer(*s).mean * 1e6)
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return {"latency_us": float(med), "spread_us": float(q3 - q1), "runs": len(times), "rel_error": rel}


def run_poisoned(func, args, n_out: int, dev=None) -> list:
    """Fill the last `n_out` arguments with NaN, call, and return them as NumPy arrays."""
    for a in args[-n_out:]:
        a.copyfrom(np.full(a.shape, np.nan, a.dtype))
    func(*args)
    if dev is not None:
        dev.sync()
    return [a.numpy() for a in args[-n_out:]]


class Bench:
    """A pool of builder processes and one measuring process (the device is shared)."""

    def __init__(self, target_json: dict, device_type: str | None, builders: int | None = None,
                 build_timeout: float = 120, run_timeout: float = 60, repeat: int = 10):
        from tvm.support.popen_pool import PopenPoolExecutor

        self.target_json, self.device_type, self.repeat = target_json, device_type, repeat
        self.dir = tempfile.TemporaryDirectory(prefix="shardtune-")
        self.n_builders = builders or max(1, os.cpu_count() or 1)
        # Builders' stderr is TVM's chatter (ROCm version guesses...); failures come back as exceptions.
        self.builders = PopenPoolExecutor(max_workers=self.n_builders, timeout=build_timeout,
                                          stderr=subprocess.DEVNULL)
        self.runner = PopenPoolExecutor(max_workers=1, timeout=run_timeout) if device_type else None
        self._n = 0
        self.ceiling_gbps = float("inf")   # set to the measured copy bandwidth

    def build_many(self, template_name: str, wl: dict, knob_list: list) -> list[tuple[str | None, str]]:
        """(artifact path or None, error) per candidate, built in parallel."""
        futures = []
        for knobs in knob_list:
            self._n += 1
            path = os.path.join(self.dir.name, f"c{self._n}.so")
            futures.append(self.builders.submit(build, template_name, wl, knobs, self.target_json, path))
        out = []
        for f in futures:
            try:
                out.append((f.result(), ""))
            except Exception as e:  # noqa: BLE001 - a failed build costs this trial only
                out.append((None, f"build: {_one_line(e)}"))
        return out

    def measure(self, path: str, template_name: str, wl: dict) -> Measurement:
        try:
            res = self.runner.submit(measure, path, template_name, wl, self.device_type,
                                     self.repeat).result()
        except TimeoutError:
            return Measurement(error="run: timed out")
        except Exception as e:  # noqa: BLE001 - a crashing kernel costs this trial only
            return Measurement(error=f"run: {_one_line(e)}")
        finally:
            try:
                os.remove(path)
            except OSError:
                pass
        m = Measurement(**res)
        if m.ok:
            from ..kernels import get_template

            gbps = get_template(template_name).bytes_moved(wl) / (m.latency_us * 1e-6) / 1e9
            if gbps > self.ceiling_gbps:
                # Faster than a plain copy: the measurement is wrong (warm cache), not the kernel fast.
                m.error = f"measurement: {gbps:.0f} GB/s exceeds the copy bandwidth {self.ceiling_gbps:.0f} GB/s"
        return m

    def copy_bandwidth(self) -> float:
        return self.runner.submit(copy_bandwidth, self.device_type).result()

    def close(self):
        self.builders.shutdown(wait=False)
        if self.runner:
            self.runner.shutdown(wait=False)
        self.dir.cleanup()


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (type(e).__name__ + ": " + (lines[-1] if lines else ""))[:300]


def copy_bandwidth(device_type: str, nbytes: int = 512 << 20, repeat: int = 10) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written:
    the ceiling no kernel's achieved bandwidth may pass. Runs in a worker."""
    import time

    import tvm

    dev = tvm.runtime.device(device_type, 0)
    if device_type == "cpu":
        nbytes = min(nbytes, 256 << 20)
        src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
        copy = lambda: np.copyto(dst, src)  # noqa: E731
    else:
        src = tvm.runtime.empty((nbytes,), "uint8", dev)
        dst = tvm.runtime.empty((nbytes,), "uint8", dev)
        copy = lambda: src.copyto(dst)  # noqa: E731
    times = []
    for _ in range(repeat + 1):
        dev.sync()
        t0 = time.perf_counter()
        copy()
        dev.sync()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / float(np.median(times[1:])) / 1e9
