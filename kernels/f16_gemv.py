"""fp16 GEMV (q0f16 models, and the LM head of q4f16_1 models): y[b, n] = sum_k x[b, k] * w[n, k],
fp16 in and out, fp32 accumulation, batch 1..4. Schedules are the shared GEMV ones."""
from __future__ import annotations

import itertools

import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from . import register
from .gemv_schedule import schedule_gemv_cpu, schedule_gemv_gpu
from .template import Template, target_is_gpu


@register
class F16Gemv(Template):
    name = "q0f16_gemv"
    gpu_knobs = {
        "rows": [1, 2, 4, 8, 16],          # output rows per thread block (threadIdx.y)
        "tx": [8, 16, 32, 64, 128],        # threads sharing one row's K (threadIdx.x)
        "vec": [2, 4, 8],                  # fp16 weights per load (8 = 16-byte loads)
        "unroll": [1, 2, 4, 8],            # weight loads per thread per step, kept in flight
        "x_scope": ["shared", "global"],   # where the activation vector is read from
    }
    cpu_knobs = {
        "rows": [1, 4, 16, 64],
        "lanes": [8, 16, 32],
        "unroll": [1, 2, 4],
    }

    def compute(self, wl):
        B, N, K = wl["batch"], wl["N"], wl["K"]

        @T.prim_func(s_tir=True)
        def f16_gemv(x: T.Buffer((B, K), "float16"), w: T.Buffer((N, K), "float16"),
                     y: T.Buffer((B, N), "float16")):
            T.func_attr({"tirx.noalias": True})
            acc = T.sblock_alloc_buffer((B, N), "float32")
            for b, n, k in T.grid(B, N, K):
                with T.sblock("gemv"):
                    vb, vn, vk = T.axis.remap("SSR", [b, n, k])
                    with T.init():
                        acc[vb, vn] = T.float32(0)
                    acc[vb, vn] += T.Cast("float32", x[vb, vk]) * T.Cast("float32", w[vn, vk])
            for b, n in T.grid(B, N):
                with T.sblock("epilogue"):
                    vb, vn = T.axis.remap("SS", [b, n])
                    y[vb, vn] = T.Cast("float16", acc[vb, vn])

        return f16_gemv

    def check(self, wl, knobs, target):
        if not target_is_gpu(target):
            if wl["N"] % knobs["rows"] or wl["K"] % (knobs["lanes"] * knobs["unroll"]):
                return "rows must divide N and lanes * unroll must divide K"
            return None
        threads = knobs["rows"] * knobs["tx"]
        if not 32 <= threads <= 1024:
            return f"{threads} threads per block"
        if wl["N"] % knobs["rows"]:
            return "rows must divide N"
        step = knobs["tx"] * knobs["vec"] * knobs["unroll"]
        if wl["K"] % step or wl["K"] == step:
            # One step per row makes TVM's buffer compaction keep a whole row of x per thread.
            return "tx * vec * unroll must divide K at least twice"
        if knobs["x_scope"] == "shared" and wl["batch"] * wl["K"] * 2 > 48 * 1024:
            return "activation does not fit 48 KB of shared memory"
        return None

    def default_knobs(self, wl, target):
        if not target_is_gpu(target):
            return {"rows": 4, "lanes": 16, "unroll": 1}
        for vec, tx, rows in itertools.product((8, 4, 2), (32, 16, 8), (4, 8, 16, 2, 1)):
            knobs = {"rows": rows, "tx": tx, "vec": vec, "unroll": 1, "x_scope": "global"}
            if self.check(wl, knobs, target) is None:
                return knobs
        raise ValueError(f"{self.name}: no valid knobs for {wl}")

    def schedule(self, wl, knobs, target):
        sch = s_tir.Schedule(tvm.IRModule({"main": self.compute(wl)}))
        if target_is_gpu(target):
            schedule_gemv_gpu(sch, "w", per_step=1, **knobs)
        else:
            schedule_gemv_cpu(sch, **knobs)
        return sch.mod

    def inputs(self, wl, rng):
        B, N, K = wl["batch"], wl["N"], wl["K"]
        x = rng.standard_normal((B, K)).astype(np.float16)
        w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float16)
        return [x, w, np.zeros((B, N), np.float16)]

    def reference(self, inputs):
        x, w = inputs[:2]
        return (x.astype(np.float32) @ w.astype(np.float32).T).astype(np.float16)

    def bytes_moved(self, wl):
        B, N, K = wl["batch"], wl["N"], wl["K"]
        return N * K * 2 + B * K * 2 + B * N * 2
