"""A sharded model on N GPUs through TVM's disco runtime and our NCCL/RCCL backend.

The controller starts one disco worker per shard (worker 0 a thread here, the others
processes), builds and loads the CCL backend in each, joins them in one communicator, and
has every worker load its shard (runtime/disco_worker.py). A step is one broadcast call:
each worker replays its decode step (one CUDA graph, the all-reduces inside it), and the
logits come back from worker 0, or with greedy decoding the tokens worker 0's GPU picked
(several steps' at once where the LM head is split: every rank then picks the same token).
Generation and benchmarks are `Model`'s own."""
from __future__ import annotations

import importlib
import os
import sys

from ..errors import UserError
from .engine import Model


def disco():
    """`tvm.runtime.disco`; `import tvm` leaves a stale placeholder for it that must go first."""
    import tvm  # noqa: F401

    mod = sys.modules.get("tvm.runtime.disco")
    if mod is None or not hasattr(mod, "ProcessSession"):
        sys.modules.pop("tvm.runtime.disco._ffi_api", None)
        sys.modules.pop("tvm.runtime.disco", None)
        mod = importlib.import_module("tvm.runtime.disco")
    return mod


def visible_gpus(device_type: str) -> int:
    import tvm

    make = tvm.cuda if device_type == "cuda" else tvm.rocm
    n = 0
    try:
        while make(n).exist:
            n += 1
    except Exception:  # noqa: BLE001 - no driver
        pass
    return n


def start_session(n: int, device_type: str = "cuda"):
    """A disco session of `n` workers on GPUs 0..n-1, joined by our NCCL/RCCL backend."""
    from . import disco_worker  # noqa: F401 - worker 0 is a thread here: register its functions
    from .ccl import load_ccl

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")   # NVLink multicast is not lent (KINDS.md)
    ccl = load_ccl(device_type)   # build once here, before the worker processes load it
    sess = disco().ProcessSession(num_workers=n, entrypoint="shardtune.runtime.disco_worker")
    sess.call_packed(sess.get_global_func("shardtune.shard.load_ccl"), device_type)
    sess.init_ccl(ccl, *range(n))
    return sess


def call_workers(sess, shards: int, name: str, *args):
    """Run a shardtune.shard.* function on every worker and wait; raise what any raised."""
    out = sess.call_packed(sess.get_global_func(name), *args)
    errors = sess.call_packed(sess.get_global_func("shardtune.shard.error"))
    for w in range(shards):
        msg = errors.debug_get_from_remote(w)
        if msg:
            raise UserError(f"GPU {w}: {msg}")
    return out


def connect_peers(call, hidden: int, shards: int) -> None:
    """Every worker allocates its peer buffer; every worker maps all the others'."""
    handles = call("shardtune.shard.comm_create", hidden, shards)
    call("shardtune.shard.comm_open", ",".join(handles.debug_get_from_remote(w) for w in range(shards)),
         hidden, shards)


class ShardedModel(Model):
    def __init__(self, path: str, seed: int = 0, allreduce: str | None = None):
        import tvm

        self._setup(path)
        self.shards = n = self.conf["shards"]
        kind = self.conf["target"]["kind"]
        if kind == "llvm":
            raise UserError(f"{path} is sharded over {n} CPUs, but disco has no CPU collective backend: "
                            "build sharded models for a GPU arch")
        device_type = "cuda" if kind == "cuda" else "rocm"
        have = visible_gpus(device_type)
        if have < n:
            raise UserError(f"{path} is sharded over {n} GPUs; {have} {device_type.upper()} GPU(s) visible here")
        if allreduce not in (None, "nccl", self.allreduce_used):
            raise UserError(f"{path} was built with --allreduce {self.allreduce_used}: it can run "
                            f"its all-reduce through nccl, not {allreduce}")
        self.dev = tvm.cuda(0) if device_type == "cuda" else tvm.rocm(0)
        self.sess = start_session(n, device_type)
        self._call("shardtune.shard.open", str(self.path), seed)
        if self.allreduce_used == "fused" and allreduce != "nccl" and self._peers_reach_each_other():
            connect_peers(self._call, self.cfg.hidden_size, n)
        else:
            self.allreduce_used = "nccl"   # without peer buffers the workers run decode_nccl
        self._step = self.sess.get_global_func("shardtune.shard.step")
        self._greedy = self.sess.get_global_func("shardtune.shard.greedy_step")
        self._greedy_steps = self.sess.get_global_func("shardtune.shard.greedy_steps")
        # ranks pick the same greedy token only from gathered logits (builds before it: replicated)
        self.BATCHED_READS = bool(self.conf.get("lm_head_split"))
        self._prefill = self.sess.get_global_func("shardtune.shard.prefill")
        self.logits = tvm.runtime.empty((1, self.cfg.vocab_size), "float32", tvm.cpu())
        self.next_token = tvm.runtime.empty((1,), "int32", tvm.cpu())
        self._last = (0, 0)   # the last greedy step's (token it picked, its position)
        self._history = None   # host copy of worker 0's greedy_steps buffer, of the same size

    def _peers_reach_each_other(self) -> bool:
        """The fused all-reduce reads the peers' memory: every pair of GPUs must reach each other.
        Where one cannot, the build's NCCL variant of the decode step runs instead (and we say so)."""
        from tvm_ffi import get_global_func

        can = get_global_func("shardtune.ipc.can_access_peer")
        blocked = [(a, b) for a in range(self.shards) for b in range(self.shards) if a != b and not can(a, b)]
        if blocked:
            a, b = blocked[0]
            print(f"note: GPU {a} cannot reach GPU {b}'s memory: the all-reduce runs through NCCL",
                  file=sys.stderr)
        return not blocked

    def _call(self, name: str, *args):
        return call_workers(self.sess, self.shards, name, *args)

    def run_step(self, token: int, pos: int):
        return self._logits_of(self.sess.call_packed(self._step, token, pos))

    def greedy_steps(self, count: int, token: int | None = None, pos: int | None = None) -> list[int]:
        """With the LM head split, every rank gathers the same logits and picks the same token: the
        workers run `count` steps on their own and the controller reads worker 0's tokens once.
        Builds with a replicated head read every step and feed worker 0's token to all."""
        if not self.BATCHED_READS:
            return [self.greedy_step(token, pos) if i == 0 else self.greedy_step() for i in range(count)]
        if token is None:
            token, pos = self._last[0], self._last[1] + 1
        self._check_pos(pos)
        remote = self.sess.call_packed(self._greedy_steps, token, pos, count)
        if self._history is None or self._history.shape[0] < count:   # grows as the workers' does
            import tvm

            self._history = tvm.runtime.empty((max(count, self.GREEDY_BATCH),), "int32", tvm.cpu())
        ids = [int(t) for t in self._from_worker_0(self._history, remote).numpy()[:count]]
        self._last = (ids[-1], pos + count - 1)
        return ids

    def greedy_step(self, token: int | None = None, pos: int | None = None, read: bool = True) -> int:
        """Every worker runs its step and picks a token on its GPU; worker 0's comes back (4 bytes)
        and is what every worker is fed next, so ranks whose logits could differ in the last bit
        (a replicated LM head) cannot part ways at a near tie. Always read, whatever `read` says."""
        if token is None:
            token, pos = self._last[0], self._last[1] + 1
        self._check_pos(pos)
        remote = self.sess.call_packed(self._greedy, token, pos)
        self._last = (int(self._from_worker_0(self.next_token, remote).numpy()[0]), pos)
        return self._last[0]

    def run_prefill(self, tokens, pos: int):
        return self._logits_of(self.sess.call_packed(self._prefill, ",".join(str(int(t)) for t in tokens), pos))

    def _logits_of(self, remote):
        """Worker 0's logits (every worker holds the same), into host memory."""
        return self._from_worker_0(self.logits, remote)

    def _from_worker_0(self, host, remote):
        """Worker 0's tensor `remote`, copied into the host tensor `host`."""
        self.sess.copy_from_worker_0(host, remote)
        self.sess.sync_worker_0()
        return host

    def device_name(self) -> str:
        return f"{self.shards} x {super().device_name()}"

    def step_seconds(self, pos: int, steps: int = 64) -> float:
        """Seconds per decode step measured on the GPUs alone, without the controller's round trip."""
        return self._call("shardtune.shard.time_steps", pos, steps).debug_get_from_remote(0)

    def close(self) -> None:
        """Stop the workers. Only by dropping every handle: the session shuts its workers down
        when the last goes, and a handle freed after an explicit shutdown aborts the process."""
        if getattr(self, "sess", None) is not None:
            import gc

            self._call("shardtune.shard.reset")
            self.sess = self._step = self._prefill = None
            gc.collect()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutting down
            pass
