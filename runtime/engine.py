"""Load a built model folder on its device and generate: `shardtune.load(path)`.

The decode step takes the token and position from device buffers and updates the KV
cache in place, so every step calls the VM with the very same tensors: what a CUDA
graph replays. The prompt goes through a batched prefill step where the build has them
(`prefill_<n>` for each bucket n in config.json's "prefill_buckets"), else through the decode
step one token at a time (builds made before prefill existed)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from ..models import LlamaConfig


def _device_for(conf: dict, device_id: int = 0):
    import tvm

    kind = conf["target"]["kind"]
    if kind == "llvm":
        return tvm.cpu(0)
    dev = tvm.cuda(device_id) if kind == "cuda" else tvm.rocm(device_id)
    try:
        ok = dev.exist
    except Exception:  # noqa: BLE001 - no driver at all
        ok = False
    if not ok:
        what = f"{conf['arch']} GPU #{device_id}" if device_id else f"{kind.upper()} GPU"
        raise UserError(f"this model was built for {conf['arch']} and needs a {what}; none is visible here")
    return dev


def read_config(path: str) -> dict:
    conf_file = Path(path) / "config.json"
    if not conf_file.is_file():
        raise UserError(f"{path}: not a shardtune model folder (no config.json); make one with `shardtune build`")
    try:
        conf = json.loads(conf_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{conf_file}: unreadable ({e})") from None
    if conf.get("format") != "shardtune-model/1":
        raise UserError(f"{conf_file}: not a shardtune model config (format {conf.get('format')!r})")
    return conf


class Model:
    """One shard of a model on one device. `load()` gives this for a one-GPU build; a
    sharded build's disco workers each hold one (runtime/disco_worker.py)."""

    def __init__(self, path: str, seed: int = 0, shard: int = 0, device_id: int = 0):
        import tvm
        from tvm import relax

        self._setup(path)
        self.shard = shard
        self.dev = _device_for(self.conf, device_id)
        self.lib = tvm.runtime.load_module(str(self.path / "model.so"))
        self.vm = relax.VirtualMachine(self.lib, self.dev)
        self.params = self._load_params(seed)
        cache = self.conf["cache"]
        self.caches = [tvm.runtime.empty(tuple(cache["shape"]), cache["dtype"], self.dev)
                       for _ in range(cache["count"])]
        self.token = tvm.runtime.empty((1,), "int32", self.dev)
        self.pos = tvm.runtime.empty((1,), "int32", self.dev)
        self._history = None   # greedy_steps' token slots
        self.comm: list = []   # a fused all-reduce's peer buffers, set by the disco worker
        self._prefill_args: dict[int, tuple] = {}   # bucket -> (tokens, pos, last) on the device

    def _setup(self, path: str) -> None:
        """What the controller needs besides the device: config, tokenizer."""
        self.path = Path(path)
        self.conf = read_config(path)
        self.cfg = LlamaConfig(**self.conf["model"])
        self.capacity = self.conf["capacity"]
        # prompt lengths the build has a prefill step for; (): prompts go token by token
        self.prefill_buckets = tuple(self.conf.get("prefill_buckets", ()))
        self.allreduce_used = self.conf.get("allreduce")   # a sharded model may fall back to nccl
        self.device_greedy = bool(self.conf.get("device_greedy"))   # older builds' steps leave it to the host
        self.tokenizer = self._load_tokenizer()

    def close(self) -> None:
        """Release what outlives garbage collection: nothing on one device (see ShardedModel)."""

    # --- loading --------------------------------------------------------------
    def _load_params(self, seed: int) -> list:
        import tvm

        specs = self.conf["params"]
        if self.conf["random_weights"]:
            from ..compiler.random_fill import fill_name, value_range

            out = []
            for i, (name, shape, dtype) in enumerate(specs):
                t = tvm.runtime.empty(tuple(shape), dtype, self.dev)
                lo, hi = value_range(name, dtype)
                fill = self.lib.get_function(fill_name(dtype), query_imports=True)
                key = (seed * 7919 + i * 104729 + self.shard * 15485863) & 0xFFFFFFFF   # differs per shard
                fill(t._create_view((int(np.prod(shape)),)), key, lo, hi)
                out.append(t)
            self.dev.sync()
            return out
        from safetensors import safe_open

        wanted = {name: (shape, dtype) for name, shape, dtype in specs}
        loaded = {}
        for f in sorted((self.path / "params").glob(f"shard-{self.shard}-*.safetensors")):
            with safe_open(str(f), framework="np") as fh:   # one tensor in host memory at a time
                for name in fh.keys() & wanted.keys():
                    arr = fh.get_tensor(name)
                    shape, dtype = wanted[name]
                    if list(arr.shape) != shape or str(arr.dtype) != dtype:
                        raise UserError(f"{self.path}/params: {name} is {arr.dtype}{list(arr.shape)}, "
                                        f"expected {dtype}{shape}")
                    loaded[name] = tvm.runtime.tensor(arr, device=self.dev)
        missing = [name for name in wanted if name not in loaded]
        if missing:
            raise UserError(f"{self.path}/params: parameter {missing[0]} is missing; rebuild the model")
        return [loaded[name] for name, _, _ in specs]

    def _load_tokenizer(self):
        f = self.path / "tokenizer.json"
        if not f.is_file():
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(f))

    # --- one step ---------------------------------------------------------------
    def step(self, token: int, pos: int) -> np.ndarray:
        """Feed `token` at position `pos`; the logits [V] for the next token (float32)."""
        self._check_pos(pos)
        return self.run_step(token, pos).numpy()[0]

    def run_step(self, token: int, pos: int):
        """One decode step; the logits [1, V] stay on the device."""
        self.token.copyfrom(np.array([token], np.int32))
        self.pos.copyfrom(np.array([pos], np.int32))
        return self._decode()[0]

    def _decode(self):
        """One decode step on the token and position buffers: (logits, [token, pos,] caches)."""
        if self.comm:
            return self.vm["decode"](self.token, self.pos, self.caches, self.comm, *self.params)
        # a fused build whose GPUs cannot reach each other's memory runs its NCCL variant
        step = "decode_nccl" if self.conf.get("allreduce") == "fused" else "decode"
        return self.vm[step](self.token, self.pos, self.caches, *self.params)

    #: greedy steps launched back to back before the host reads their tokens, in one read
    GREEDY_BATCH = 8
    BATCHED_READS = True   # False for sharded builds whose ranks could pick different tokens

    def _read_every(self, read_every: int | None) -> int:
        if read_every is not None and read_every < 1:
            raise UserError(f"--read-every must be positive, got {read_every}")
        return (read_every or self.GREEDY_BATCH) if self.BATCHED_READS else 1

    def greedy_steps(self, count: int, token: int | None = None, pos: int | None = None) -> list[int]:
        """`count` greedy steps launched back to back, then one read of their tokens. A read after
        every step left the GPU idle for the host's turn-around each time (the read, the next
        launch: about 5% of a 7B step on an H100); here the host launches a step while the GPU
        runs the one before. Each step's token is copied, on the device, into its slot of a small
        history buffer. `token`, `pos` start a run; None continues it."""
        return [int(t) for t in self.launch_greedy(count, token, pos).numpy()[:count]]

    def launch_greedy(self, count: int, token: int | None = None, pos: int | None = None):
        """greedy_steps without the read: the device buffer whose first `count` slots will hold
        the tokens (a disco worker hands it to the controller)."""
        if token is not None:
            self._check_pos(pos)
            self.token.copyfrom(np.array([token], np.int32))
            self.pos.copyfrom(np.array([pos], np.int32))
        if self._history is None or self._history.shape[0] < count:
            import tvm

            self._history = tvm.runtime.empty((max(count, self.GREEDY_BATCH),), "int32", self.dev)
            self._history_slots = [self._history._create_view((1,), "int32", 4 * i)
                                   for i in range(self._history.shape[0])]
        for slot in self._history_slots[:count]:
            self._decode()
            self.token.copyto(slot)
        return self._history

    def greedy_step(self, token: int | None = None, pos: int | None = None, read: bool = True) -> int | None:
        """One decode step that picks its next token (argmax) on the device and advances the
        position there: the host reads 4 bytes (none, and does not wait, with read=False).
        `token`, `pos` start a run; None continues it."""
        if token is not None:
            self._check_pos(pos)
            self.token.copyfrom(np.array([token], np.int32))
            self.pos.copyfrom(np.array([pos], np.int32))
        self._decode()
        return int(self.token.numpy()[0]) if read else None

    def run_prefill(self, tokens, pos: int):
        """One batched prefill call: `tokens` (a sequence of ints, 1 .. max(prefill_buckets) of
        them) at positions pos .. pos + len - 1, their K/V rows into the caches; the logits [1, V]
        float32 of the last one, on the device. The tokens are padded with id 0 up to the next
        bucket: the padding writes cache rows pos + len .. pos + bucket - 1 (those below the
        capacity), which the steps that follow overwrite before reading. The caller checks that
        pos + len <= capacity."""
        tokens = np.asarray([int(t) for t in tokens], np.int32)
        n = len(tokens)
        bucket = next((b for b in self.prefill_buckets if b >= n), None)
        if n == 0 or bucket is None:
            raise UserError(f"a prefill call takes 1..{max(self.prefill_buckets, default=0)} tokens, got {n}")
        if bucket not in self._prefill_args:
            import tvm

            self._prefill_args[bucket] = (tvm.runtime.empty((bucket,), "int32", self.dev),
                                          tvm.runtime.empty((1,), "int32", self.dev),
                                          tvm.runtime.empty((1,), "int32", self.dev))
        ids, first, last = self._prefill_args[bucket]
        ids.copyfrom(np.pad(tokens, (0, bucket - n)))
        first.copyfrom(np.array([pos], np.int32))
        last.copyfrom(np.array([n - 1], np.int32))
        logits, _ = self.vm[f"prefill_{bucket}"](ids, first, last, self.caches, *self.params)
        return logits

    def prefill(self, ids: list[int], pos: int = 0) -> np.ndarray:
        """Feed `ids` at positions pos, pos + 1, ...; the logits [V] for the token after them.
        Batched (chunks of the largest bucket, the rest padded to the next bucket) where the
        build has prefill steps, else token by token through the decode step."""
        self._check_pos(pos + len(ids) - 1)
        if not self.prefill_buckets:
            for i, t in enumerate(ids):
                logits = self.step(t, pos + i)
            return logits
        chunk = max(self.prefill_buckets)
        for i in range(0, len(ids), chunk):
            logits = self.run_prefill(ids[i:i + chunk], pos + i)
        return logits.numpy()[0]

    def device_name(self) -> str:
        return _device_name(self.dev)

    def _check_pos(self, pos: int) -> None:
        if pos >= self.capacity:
            raise UserError(f"context full: the KV cache holds {self.capacity} tokens (build with a larger --capacity)")

    # --- generation -------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise UserError(f"{self.path} has no tokenizer.json (random weights?): pass --prompt-ids")
        return self.tokenizer.encode(prompt).ids

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else " ".join(map(str, ids))

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, on_token: Callable[[int], None] | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                 return_logits: bool = False, read_every: int | None = None):
        """Greedy when temperature is 0, else nucleus sampling. Returns the new ids
        (and each step's logits when asked). Greedy tokens picked on the device are read
        `read_every` steps at a time (GREEDY_BATCH by default) and handed out one by one."""
        read_every = self._read_every(read_every)
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise UserError("the prompt is empty")
        vocab = self.cfg.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise UserError(f"prompt ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        if len(ids) + max_new_tokens > self.capacity:
            raise UserError(f"prompt ({len(ids)}) + new tokens ({max_new_tokens}) exceed the KV cache ({self.capacity})")
        rng = np.random.default_rng(seed)
        eos = self.conf.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [eos]) if stop_at_eos and eos is not None else set()
        on_device = self.device_greedy and temperature <= 0 and not return_logits
        logits = self.prefill(ids)
        out, all_logits = [], []
        pos = len(ids)
        nxt = sample(logits, temperature, top_p, rng)
        picked = []   # tokens the device picked ahead, not handed out yet
        while True:
            all_logits.append(logits)
            out.append(nxt)
            if on_token:
                on_token(nxt)
            if nxt in eos or len(out) == max_new_tokens:
                break
            if on_device:   # the steps after the first continue from the device's own tokens
                if not picked:
                    count = min(read_every, max_new_tokens - len(out))
                    picked = self.greedy_steps(count, nxt, pos) if len(out) == 1 else self.greedy_steps(count)
                nxt = picked.pop(0)   # past an end-of-sequence token the rest are dropped
            else:
                logits = self.step(nxt, pos)
                nxt = sample(logits, temperature, top_p, rng)
            pos += 1
        return (out, np.stack(all_logits)) if return_logits else out

    def bench(self, prompt_len: int = 8, gen_len: int = 256, repeat: int = 3, seed: int = 0,
              host_argmax: bool = False, read_every: int | None = None) -> dict:
        """Decode tokens/s, prefill time, memory, and the fraction of the memory roofline. Greedy
        decoding picks its tokens on the device where the build can (`host_argmax`: copy the
        logits out and take the argmax in NumPy instead, to compare the two; the step's own argmax
        kernel still runs, unused)."""
        from ..tuner.measure import copy_bandwidth

        read_every = self._read_every(read_every)
        if prompt_len < 1 or gen_len < 1 or repeat < 1:
            raise UserError("--prompt-len, --gen-len and --repeat must be positive")
        if prompt_len + gen_len > self.capacity:
            raise UserError(f"prompt + generation ({prompt_len + gen_len}) exceed the KV cache ({self.capacity})")
        on_device = self.device_greedy and not host_argmax
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, self.cfg.vocab_size, prompt_len).tolist()
        self.generate(prompt, max_new_tokens=4, stop_at_eos=False)   # warm-up: first launches, graph capture
        prefill, decode = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            logits = self.prefill(prompt)
            t1 = time.perf_counter()
            tok, pos = int(np.argmax(logits)), prompt_len
            if on_device:   # as generate does it
                for done in range(0, gen_len, read_every):
                    count = min(read_every, gen_len - done)
                    self.greedy_steps(count, tok, pos) if done == 0 else self.greedy_steps(count)
            else:
                for _ in range(gen_len):
                    tok = int(np.argmax(self.step(tok, pos)))
                    pos += 1
            t2 = time.perf_counter()
            prefill.append(t1 - t0)
            decode.append(gen_len / (t2 - t1))
        weight_bytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for n, s, d in self.conf["params"]
                           if not n.startswith("embed"))
        device_type = {"llvm": "cpu", "cuda": "cuda", "rocm": "rocm"}[self.conf["target"]["kind"]]
        copy_gbps = copy_bandwidth(device_type)
        tok_s = float(np.median(decode))
        return {
            "model": self.cfg.name, "quant": self.conf["quant"], "shards": self.conf["shards"],
            "allreduce": self.allreduce_used,
            "arch": self.conf["arch"], "device": self.device_name(), "prompt_len": prompt_len,
            "gen_len": gen_len, "repeat": repeat, "decode_tok_s": tok_s, "decode_tok_s_runs": decode,
            "prefill_ms": float(np.median(prefill)) * 1e3,
            "prefill": "batched" if self.prefill_buckets else "token by token through the decode step",
            "prefill_buckets": list(self.prefill_buckets),
            "greedy": f"argmax on the device, tokens read {read_every} at a time" if on_device
                      else "logits copied to the host, argmax there",
            "weight_bytes_per_token": weight_bytes, "copy_gbps": copy_gbps,
            "roofline_fraction": weight_bytes * tok_s / (copy_gbps * 1e9),
            "gpu_memory_bytes": _memory_used(self),
            "random_weights": self.conf["random_weights"], "use_cuda_graph": self.conf.get("use_cuda_graph", False),
            "pdl": self.conf.get("pdl", False),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def sample(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = (logits - logits.max()) / temperature
    p = np.exp(z.astype(np.float64))
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


def _device_name(dev) -> str:
    if dev.dlpack_device_type() == 1:
        import platform

        return platform.processor() or platform.machine()
    return dev.device_name


def _memory_used(model: Model) -> int:
    """Bytes of parameters and KV cache the model holds on each of its devices."""
    conf = model.conf
    params = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in conf["params"])
    cache = conf["cache"]
    return int(params + cache["count"] * int(np.prod(cache["shape"])) * np.dtype(cache["dtype"]).itemsize)


def load(path: str, seed: int = 0, allreduce: str | None = None) -> Model:
    """The model in `path` on as many GPUs as it has shards. `allreduce="nccl"` runs a fused
    build's NCCL variant (to compare the two on the same weights)."""
    if read_config(path)["shards"] > 1:
        from .sharded import ShardedModel

        return ShardedModel(path, seed, allreduce=allreduce)
    return Model(path, seed)
