"""fp16 GEMV (q0f16 models, and the LM head of q4f16_1 models): y[b, n] = sum_k x[b, k] * w[n, k],
fp16 in and out, fp32 accumulation, batch 1..4. Schedules are the shared GEMV ones."""
from __future__ import annotations


import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from . import register
from .gemv_schedule import (CPU_DEFAULT, CPU_KNOBS, K_LOOPS, check_cpu, check_gpu, default_gpu_knobs,
                            schedule_gemv_cpu, schedule_gemv_gpu)
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
        "k_loop": K_LOOPS,                 # K steps in a loop, or unrolled: all loads issued at once
    }
    cpu_knobs = CPU_KNOBS

    def output_specs(self, wl):
        return [((wl["batch"], wl["N"]), "float16")]

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
            return check_cpu(knobs, wl["N"], wl["K"])
        return check_gpu(knobs, wl["N"], wl["K"], wl["batch"], wl["K"], "K")

    def default_knobs(self, wl, target):
        if not target_is_gpu(target):
            return dict(CPU_DEFAULT)
        return default_gpu_knobs(self, wl, target, (8, 4, 2), (32, 16, 8))

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
