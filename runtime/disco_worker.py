"""What runs inside each disco worker of a sharded model.

`python -m shardtune.runtime.disco_worker` is the entry point of worker processes 1..N-1;
worker 0 is a thread of the controller, which imports this module for the same functions.
Each worker holds one shard as a `Model` on its own GPU; the controller (sharded.py) calls
these functions on all workers at once, and NCCL joins them inside the decode step."""
from __future__ import annotations

import sys
import time
import traceback

import tvm  # noqa: F401 - loads the disco runtime (runtime.disco.WorkerProcess)
from tvm_ffi import get_global_func, register_global_func

_shard: dict = {}   # this worker's Model, under "model"; its last error under "error"


def _guard(fn):
    """An exception escaping a disco worker's function aborts its process (and worker 0 lives
    in the controller's). Keep it here instead, for `shardtune.shard.error` to report."""
    def run(*args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001
            _shard["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stderr)
            return None
    return run


@register_global_func("shardtune.shard.load_ccl", override=True)
@_guard
def _load_ccl(device_type: str) -> str:
    from .ccl import load_ccl

    return load_ccl(device_type)


@register_global_func("shardtune.shard.open", override=True)
@_guard
def _open(path: str, seed: int) -> int:
    from .engine import Model

    rank = int(get_global_func("runtime.disco.worker_id")()[0])
    _shard["model"] = Model(path, seed, shard=rank, device_id=rank)
    return rank


@register_global_func("shardtune.shard.comm_create", override=True)
@_guard
def _comm_create(hidden: int, shards: int) -> str:
    """Allocate this GPU's peer-visible buffer; its IPC handle, hex, for the controller to share."""
    from ..kernels.allreduce_add_norm import comm_bytes

    _shard["comm_own"] = get_global_func("shardtune.ipc.alloc")(comm_bytes(hidden, shards))
    return bytes(get_global_func("shardtune.ipc.handle")(_shard["comm_own"])).hex()


@register_global_func("shardtune.shard.comm_open", override=True)
@_guard
def _comm_open(handles: str, hidden: int, shards: int) -> int:
    """Map every peer's buffer; the views (each region of every GPU, rank-relative: position p
    is the GPU p ranks after this one, kernels/allreduce_add_norm.py) go to the model if one is
    loaded."""
    from ..kernels.allreduce_add_norm import comm_bytes, comm_regions

    n, rank = shards, int(get_global_func("runtime.disco.worker_id")()[0])
    hexes, ipc_open = handles.split(","), get_global_func("shardtune.ipc.open")
    nbytes = comm_bytes(hidden, n)
    opened = [_shard["comm_own"]] + [ipc_open(bytes.fromhex(hexes[(rank + p) % n]), nbytes) for p in range(1, n)]
    _shard["comm"] = [b._create_view(shape, dtype, at) for at, shape, dtype in comm_regions(hidden, n)
                      for b in opened]
    if "model" in _shard:
        _shard["model"].comm = _shard["comm"]
    return n


@register_global_func("shardtune.shard.step", override=True)
@_guard
def _step(token: int, pos: int):
    return _shard["model"].run_step(token, pos)


@register_global_func("shardtune.shard.greedy_step", override=True)
@_guard
def _greedy_step(token: int, pos: int):
    """A step that also picks the next token on this GPU; its token buffer, for the controller
    to read worker 0's (it feeds that one to every worker next)."""
    m = _shard["model"]
    m.greedy_step(token, pos, read=False)
    return m.token


@register_global_func("shardtune.shard.greedy_steps", override=True)
@_guard
def _greedy_steps(token: int, pos: int, count: int):
    """`count` greedy steps from `token` at `pos`, each rank feeding its own tokens (with the LM
    head split, every rank picks the same); the buffer that will hold them, for the controller."""
    return _shard["model"].launch_greedy(count, token, pos)


@register_global_func("shardtune.shard.prefill", override=True)
@_guard
def _prefill(tokens: str, pos: int):
    return _shard["model"].run_prefill([int(t) for t in tokens.split(",")], pos)


@register_global_func("shardtune.shard.time_steps", override=True)
@_guard
def _time_steps(pos: int, steps: int) -> float:
    """Seconds per decode step on this worker alone (the controller out of the loop)."""
    m = _shard["model"]
    m.run_step(1, pos)
    m.dev.sync()
    t0 = time.perf_counter()
    for i in range(steps):
        m.run_step(1, pos + i)
    m.dev.sync()
    return (time.perf_counter() - t0) / steps


@register_global_func("shardtune.shard.time_allreduce", override=True)
@_guard
def _time_allreduce(numel: int, dtype: str, iters: int) -> float:
    """Seconds per all-reduce of `numel` elements, launched back to back on this worker."""
    from tvm_ffi import Shape

    dev = get_global_func("runtime.disco.device")()
    x = tvm.runtime.empty((numel,), dtype, dev)
    y = tvm.runtime.empty((numel,), dtype, dev)
    allreduce = get_global_func("runtime.disco.allreduce")
    for _ in range(10):
        allreduce(x, Shape([0]), True, y)
    dev.sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        allreduce(x, Shape([0]), True, y)
    dev.sync()
    return (time.perf_counter() - t0) / iters


@register_global_func("shardtune.shard.time_reduce_norm", override=True)
@_guard
def _time_reduce_norm(hidden: int, iters: int, reps: int) -> str:
    """The fused all-reduce + add + RMSNorm against an NCCL all-reduce followed by the add+norm
    kernel, on this worker's GPU while every other worker does the same (comm_open first). Each
    variant at every valid knob, as GPU graphs of `iters` calls replayed `reps` times: JSON
    {variant: {knobs: seconds per call}}, plus the all-reduce and the add+norm alone."""
    import itertools
    import json

    import numpy as np
    from tvm_ffi import Shape

    from ..kernels import get_template
    from ..tuner.targets import get_arch, local_gpu_arch

    n = len(_shard["comm"]) // 3
    dev = get_global_func("runtime.disco.device")()
    target = tvm.target.Target(get_arch(local_gpu_arch()).target)
    rng = np.random.default_rng(int(get_global_func("runtime.disco.worker_id")()[0]))
    partial, residual, xsum, y, h = (tvm.runtime.tensor(rng.standard_normal((1, hidden)).astype("float16"), dev)
                                     for _ in range(5))
    weight = tvm.runtime.tensor(np.ones(hidden, "float16"), dev)
    allreduce = get_global_func("runtime.disco.allreduce")
    graph_seconds = get_global_func("shardtune.graph.seconds")

    def timed(call) -> float:
        call()   # loads the module outside the capture
        dev.sync()
        return graph_seconds(lambda: [call() for _ in range(iters)], reps) / iters

    def kernels(name, wl):
        tpl = get_template(name)
        space = tpl.space_for(target)
        for values in itertools.product(*space.values()):
            knobs = dict(zip(space, values))
            if tpl.check(wl, knobs, target) is None:
                yield json.dumps(knobs, sort_keys=True), tvm.compile(tpl.schedule(wl, knobs, target), target=target)["main"]

    out = {"allreduce": {"": timed(lambda: allreduce(partial, Shape([0]), True, xsum))},
           "add_norm": {}, "nccl_add_norm": {}, "fused_flag": {}, "fused_ll": {}, "fused_ll_cluster": {}}
    for key, f in kernels("add_rms_norm", {"H": hidden, "batch": 1}):
        out["add_norm"][key] = timed(lambda: f(xsum, residual, weight, y, h))
        out["nccl_add_norm"][key] = timed(lambda: (allreduce(partial, Shape([0]), True, xsum),
                                                   f(xsum, residual, weight, y, h)))
    for key, f in kernels("allreduce_add_norm", {"H": hidden, "shards": n, "batch": 1}):
        knobs = json.loads(key)   # `ll` on one block and on a cluster apart, to see what the cluster adds
        variant = "fused_" + knobs["protocol"] + ("_cluster" if knobs.get("blocks", 1) > 1 and knobs["protocol"] == "ll" else "")
        out[variant][key] = timed(lambda: f(partial, residual, weight, *_shard["comm"], y, h))
    return json.dumps(out)


@register_global_func("shardtune.shard.reset", override=True)
@_guard
def _reset() -> int:
    _shard.pop("model", None)
    return 0


@register_global_func("shardtune.shard.error", override=True)
def _error() -> str:
    return _shard.pop("error", "")


def main() -> None:
    worker_id, num_workers, num_groups, read_fd, write_fd = map(int, sys.argv[1:6])
    get_global_func("runtime.disco.WorkerProcess")(worker_id, num_workers, num_groups, read_fd, write_fd)


if __name__ == "__main__":
    try:
        main()
    except (OSError, KeyboardInterrupt):
        pass
