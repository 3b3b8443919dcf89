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


def comm_layout(hidden: int, shards: int) -> tuple[int, int]:
    """(byte offset of the flag words, bytes) of one GPU's buffer for the fused all-reduce:
    two slots of `hidden` fp16 values, then one int32 flag word per GPU."""
    flags_at = -(-2 * hidden * 2 // 256) * 256
    return flags_at, flags_at + 4 * shards


@register_global_func("shardtune.shard.comm_create", override=True)
@_guard
def _comm_create() -> str:
    """Allocate this GPU's peer-visible buffer; its IPC handle, hex, for the controller to share."""
    m = _shard["model"]
    _, nbytes = comm_layout(m.cfg.hidden_size, m.conf["shards"])
    _shard["comm_own"] = get_global_func("shardtune.ipc.alloc")(nbytes)
    return bytes(get_global_func("shardtune.ipc.handle")(_shard["comm_own"])).hex()


@register_global_func("shardtune.shard.comm_open", override=True)
@_guard
def _comm_open(handles: str) -> int:
    """Map every peer's buffer and hand the model its views, rank-relative: position p is the GPU
    p ranks after this one (kernels/allreduce_add_norm.py)."""
    m = _shard["model"]
    n, hidden, rank = m.conf["shards"], m.cfg.hidden_size, m.shard
    flags_at, nbytes = comm_layout(hidden, n)
    hexes, ipc_open = handles.split(","), get_global_func("shardtune.ipc.open")
    opened = [_shard["comm_own"]] + [ipc_open(bytes.fromhex(hexes[(rank + p) % n]), nbytes) for p in range(1, n)]
    m.comm = ([b._create_view((2, hidden), "float16") for b in opened]
              + [b._create_view((n,), "int32", flags_at) for b in opened])
    return n


@register_global_func("shardtune.shard.step", override=True)
@_guard
def _step(token: int, pos: int):
    return _shard["model"].run_step(token, pos)


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
