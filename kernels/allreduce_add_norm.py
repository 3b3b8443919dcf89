"""All-reduce + residual add + RMSNorm in one kernel per GPU, over peer (P2P) memory.

After a row-parallel layer each of N GPUs holds a partial sum x_g [1, H]. Instead of an NCCL
all-reduce and then add_rms_norm, every GPU runs this kernel once (one-shot):

  1. copy its partial into its own communication buffer, slot r % 2 (r: this call's round);
  2. flag barrier: post r into every peer's flag word for it, wait until every peer posted r;
  3. read the peers' slots over NVLink, x = sum of all partials (fp32, rounded to fp16 as an
     fp16 all-reduce would), h = x + residual (written: the next residual), y = RMSNorm(h) * w.

Buffers and flags are IPC-shared allocations (runtime/ccl.cc), passed rank-relative: position p
is the GPU p ranks after this one, position 0 this GPU. Flag word p of a GPU is written by the
GPU p ranks before it; word 0 is its round counter. Two slots suffice: a GPU cannot start round
r+2 before every peer has arrived at round r+1, and so has finished reading round r.

The barrier uses CUDA's atomicExch / atomicAdd / __threadfence_system through extern calls, so
the GPU schedule is for NVIDIA only (ROCm builds keep RCCL). The CPU schedule is the same
arithmetic without a barrier (one process has no peers), for numerics checks. One-shot only: at
batch 1 a message is H fp16 values (16 KB at H=8192), where a two-shot reduce-scatter + gather
would add a second barrier for nothing."""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np

from . import register
from .rms_norm import EPS
from .template import Template, target_is_gpu

READY = 1 << 30   # flag value that lets a single-GPU run (tests, timing) pass the barrier at once


def _kernel(N: int, H: int, threads: int, gpu: bool):
    import tvm
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    f32, f16 = "float32", "float16"
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("main")
            # No "noalias": peers write the flag words while this kernel polls them.
            partial = T.arg("partial", T.buffer((1, H), f16))
            residual = T.arg("residual", T.buffer((1, H), f16))
            weight = T.arg("weight", T.buffer((H,), f16))
            comm = [T.arg(f"comm_{p}", T.buffer((2, H), f16)) for p in range(N)]
            flags = [T.arg(f"flags_{p}", T.buffer((N,), "int32")) for p in range(N)]
            y = T.arg("y", T.buffer((1, H), f16))
            h = T.arg("h", T.buffer((1, H), f16))
            launch = ExitStack()
            if gpu:
                launch.enter_context(T.launch_thread(T.env_thread("blockIdx.x"), 1))
                tx = T.env_thread("threadIdx.x")
                launch.enter_context(T.launch_thread(tx, threads))
            else:
                tx, threads = 0, 1
            per = H // threads
            rnd = T.alloc_buffer((1,), "int32", scope="local")
            hv = T.alloc_buffer((per,), f32, scope="local")
            ssq = T.alloc_buffer((1,), f32, scope="local")
            T.buffer_store(rnd, flags[0][0] + 1, [0])
            slot = rnd[0] % 2
            with T.serial(0, per) as i:   # thread tx owns elements tx, tx + threads, ...
                T.buffer_store(comm[0], partial[0, i * threads + tx], [slot, i * threads + tx])
            if gpu and N > 1:
                T.evaluate(T.tvm_storage_sync("shared"))   # the block's copies are done
                with T.If(tx == 0):
                    with T.Then():
                        T.evaluate(T.call_extern("int32", "__threadfence_system"))   # ... and visible
                        for p in range(1, N):
                            T.evaluate(T.call_extern("int32", "atomicExch", T.address_of(flags[p][p]), rnd[0]))
                        for p in range(1, N):
                            with T.While(T.call_extern("int32", "atomicAdd", T.address_of(flags[0][p]), 0) < rnd[0]):
                                T.evaluate(0)
                        T.evaluate(T.call_extern("int32", "__threadfence"))
                T.evaluate(T.tvm_storage_sync("shared"))
            T.buffer_store(ssq, T.float32(0), [0])
            with T.serial(0, per) as i:
                k = i * threads + tx
                total = T.Cast(f32, partial[0, k])
                for p in range(1, N):
                    total = total + T.Cast(f32, comm[p][slot, k])
                hk = T.Cast(f16, T.Cast(f32, T.Cast(f16, total)) + T.Cast(f32, residual[0, k]))
                T.buffer_store(h, hk, [0, k])
                T.buffer_store(hv, T.Cast(f32, hk), [i])
                T.buffer_store(ssq, ssq[0] + T.Cast(f32, hk) * T.Cast(f32, hk), [0])
            if gpu:   # block-wide sum of squares: a tree over shared memory
                red = T.alloc_buffer((threads,), f32, scope="shared")
                T.buffer_store(red, ssq[0], [tx])
                T.evaluate(T.tvm_storage_sync("shared"))
                stride = threads // 2
                while stride >= 1:
                    with T.If(tx < stride):
                        with T.Then():
                            T.buffer_store(red, red[tx] + red[tx + stride], [tx])
                    T.evaluate(T.tvm_storage_sync("shared"))
                    stride //= 2
                total_ssq = red[0]
            else:
                total_ssq = ssq[0]
            inv = T.rsqrt(total_ssq / T.float32(H) + T.float32(EPS))
            with T.serial(0, per) as i:
                k = i * threads + tx
                T.buffer_store(y, T.Cast(f16, hv[i] * inv * T.Cast(f32, weight[k])), [0, k])
            if gpu:
                T.evaluate(T.tvm_storage_sync("shared"))   # everyone has read the counter
                with T.If(tx == 0):
                    with T.Then():
                        T.buffer_store(flags[0], rnd[0], [0])
            else:
                T.buffer_store(flags[0], rnd[0], [0])
            launch.close()
    return ib.get()


@register
class AllReduceAddNorm(Template):
    name = "allreduce_add_norm"
    dlight_baseline = False
    gpu_knobs = {"threads": [128, 256, 512, 1024]}   # one block; each thread owns H / threads values
    cpu_knobs = {}
    tolerance = 2e-3

    def output_specs(self, wl):
        return [((1, wl["H"]), "float16")] * 2   # y, h

    def compute(self, wl):
        return _kernel(wl["shards"], wl["H"], 1, gpu=False)

    def check(self, wl, knobs, target):
        if wl.get("batch", 1) != 1:
            return "batch 1 only"
        if target_is_gpu(target):
            if target.kind.name != "cuda":
                return "the flag barrier is CUDA-only"
            if wl["H"] % knobs["threads"]:
                return "threads must divide H"
        return None

    def default_knobs(self, wl, target):
        if not target_is_gpu(target):
            return {}
        for threads in (1024, 512, 256, 128):
            if wl["H"] % threads == 0:
                return {"threads": threads}
        raise ValueError(f"{self.name}: no valid knobs for {wl}")

    def schedule(self, wl, knobs, target):
        import tvm

        gpu = target_is_gpu(target)
        func = _kernel(wl["shards"], wl["H"], knobs["threads"] if gpu else 1, gpu)
        return tvm.IRModule({"main": func})

    def inputs(self, wl, rng):
        """One GPU standing in for all: the peers' slot of round 1 holds their partials and
        this GPU's flags say every peer is ready."""
        N, H = wl["shards"], wl["H"]
        partial = rng.standard_normal((1, H)).astype(np.float16)
        residual = rng.standard_normal((1, H)).astype(np.float16)
        weight = (1 + 0.1 * rng.standard_normal(H)).astype(np.float16)
        comm = [np.zeros((2, H), np.float16) for _ in range(N)]
        for p in range(1, N):
            comm[p][1] = rng.standard_normal(H).astype(np.float16)
        flags = [np.zeros(N, np.int32) for _ in range(N)]
        flags[0][1:] = READY
        out = [np.zeros((1, H), np.float16), np.zeros((1, H), np.float16)]
        return [partial, residual, weight, *comm, *flags, *out]

    def reference(self, inputs):
        partial, residual, weight = inputs[:3]
        N = (len(inputs) - 5) // 2
        comm = inputs[3:3 + N]
        rnd = int(inputs[3 + N][0]) + 1
        x = partial[0].astype(np.float32) + sum(c[rnd % 2].astype(np.float32) for c in comm[1:])
        h = (x.astype(np.float16).astype(np.float32) + residual[0].astype(np.float32)).astype(np.float16)
        hf = h.astype(np.float32)
        y = (hf / np.sqrt(np.mean(hf * hf) + EPS) * weight.astype(np.float32)).astype(np.float16)
        return [y[None], h[None]]

    def bytes_moved(self, wl):
        N, H = wl["shards"], wl["H"]
        return 2 * H * (N + 1 + 1 + 2) + 2 * H   # partials (own + peers), residual, weight, y and h, own copy
