"""RMSNorm of a batch of hidden vectors, optionally fused with the residual add before it:
h = x + residual (written back: the next residual), y = h / sqrt(mean(h^2) + eps) * weight.
fp16 in and out, fp32 statistics. CPU: a TensorIR schedule of the compute. GPU: written directly
as TIR (one thread block per batch row, the row in registers), so that the weight's load can come
first."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from . import register
from .template import Template, target_is_gpu

EPS = 1e-5


def rms_compute(B: int, H: int, add: bool):
    @T.macro
    def norm(h, weight, y):
        ssq = T.sblock_alloc_buffer((B,), "float32")
        for b, k in T.grid(B, H):
            with T.sblock("ssq"):
                vb, vk = T.axis.remap("SR", [b, k])
                with T.init():
                    ssq[vb] = T.float32(0)
                ssq[vb] += T.Cast("float32", h[vb, vk]) * T.Cast("float32", h[vb, vk])
        for b, k in T.grid(B, H):
            with T.sblock("norm"):
                vb, vk = T.axis.remap("SS", [b, k])
                y[vb, vk] = T.Cast("float16", T.Cast("float32", h[vb, vk])
                                   * T.rsqrt(ssq[vb] / T.float32(H) + T.float32(EPS))
                                   * T.Cast("float32", weight[vk]))

    if add:
        @T.prim_func(s_tir=True)
        def add_rms_norm(x: T.Buffer((B, H), "float16"), residual: T.Buffer((B, H), "float16"),
                         weight: T.Buffer((H,), "float16"), y: T.Buffer((B, H), "float16"),
                         h: T.Buffer((B, H), "float16")):
            T.func_attr({"tirx.noalias": True})
            # The sum goes to an intermediate first, so a schedule can inline it into both passes
            # (an output block cannot be inlined or moved under another block's loops).
            hs = T.sblock_alloc_buffer((B, H), "float16")
            for b, k in T.grid(B, H):
                with T.sblock("add"):
                    vb, vk = T.axis.remap("SS", [b, k])
                    hs[vb, vk] = x[vb, vk] + residual[vb, vk]
            norm(hs, weight, y)
            for b, k in T.grid(B, H):
                with T.sblock("store_h"):
                    vb, vk = T.axis.remap("SS", [b, k])
                    h[vb, vk] = hs[vb, vk]
        return add_rms_norm

    @T.prim_func(s_tir=True)
    def rms_norm(x: T.Buffer((B, H), "float16"), weight: T.Buffer((H,), "float16"),
                 y: T.Buffer((B, H), "float16")):
        T.func_attr({"tirx.noalias": True})
        norm(x, weight, y)
    return rms_norm


@register
class RMSNorm(Template):
    name = "rms_norm"
    add = False
    # dlight's rule for the fused add+norm measured 156 us at H=8192 on H100 (one row, little
    # parallelism); the default knobs 8 us. Without a record, builds use the default knobs.
    dlight_baseline = False
    gpu_knobs = {
        "threads": [64, 128, 256, 512, 1024],   # threads of the block that owns a row
        # fp16 elements per load. Not 8: TVM's CUDA codegen builds a float x8 broadcast with
        # make_ulonglong4(8 floats), which does not compile.
        "vec": [1, 2, 4],
    }
    cpu_knobs = {
        "lanes": [8, 16, 32],                  # partial sums kept in SIMD registers
    }
    tolerance = 2e-3

    def output_specs(self, wl):
        return [((wl["batch"], wl["H"]), "float16")] * (2 if self.add else 1)   # y (, h)

    def compute(self, wl):
        return rms_compute(wl["batch"], wl["H"], self.add)

    def check(self, wl, knobs, target):
        if not target_is_gpu(target):
            return None if wl["H"] % knobs["lanes"] == 0 else "lanes must divide H"
        if wl["H"] % (knobs["threads"] * knobs["vec"]):
            return "threads * vec must divide H"
        return None

    def default_knobs(self, wl, target):
        if not target_is_gpu(target):
            return {"lanes": 16}
        for threads in (256, 128, 64, 512, 1024):
            for vec in (4, 2, 1):
                if self.check(wl, {"threads": threads, "vec": vec}, target) is None:
                    return {"threads": threads, "vec": vec}
        raise ValueError(f"{self.name}: no valid knobs for {wl}")

    def schedule(self, wl, knobs, target):
        if target_is_gpu(target):
            return tvm.IRModule({"main": _gpu_func(wl["batch"], wl["H"], self.add, **knobs)})
        sch = s_tir.Schedule(tvm.IRModule({"main": self.compute(wl)}))
        _schedule_cpu(sch, self.add, **knobs)
        return sch.mod

    def inputs(self, wl, rng):
        B, H = wl["batch"], wl["H"]
        x = rng.standard_normal((B, H)).astype(np.float16)
        w = (1 + 0.1 * rng.standard_normal(H)).astype(np.float16)
        if self.add:
            r = rng.standard_normal((B, H)).astype(np.float16)
            return [x, r, w, np.zeros((B, H), np.float16), np.zeros((B, H), np.float16)]
        return [x, w, np.zeros((B, H), np.float16)]

    def reference(self, inputs):
        if self.add:
            x, r, w = inputs[:3]
            h = x + r                                   # fp16 add, as the kernel does
        else:
            (x, w), h = inputs[:2], inputs[0]
        hf = h.astype(np.float32)
        y = (hf / np.sqrt(np.mean(hf * hf, axis=1, keepdims=True) + EPS) * w.astype(np.float32)).astype(np.float16)
        return [y, h] if self.add else y               # outputs y, then h (the next residual)

    def bytes_moved(self, wl):
        B, H = wl["batch"], wl["H"]
        return (B * H * (4 if not self.add else 8)) + H * 2


def _shfl_xor(val, lane, off):
    """`val` of lane `lane ^ off` within 32 lanes (an index shuffle: ROCm has no xor shuffle)."""
    return T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), val, T.bitwise_xor(lane, off), 32, 32)


def _gpu_func(B: int, H: int, add: bool, threads: int, vec: int):
    """One block per row; thread t holds the vec-wide slices t, t + threads, ... of the row in
    registers. Its slices of the weight are loaded first: the weight comes from DRAM (a decode step
    streams far more than the L2 holds), the row from L2 (the kernel before just wrote it). Loaded
    after the sum of squares, as a sum-then-scale schedule does, the weight's DRAM latency came
    after the row's and the reduction's, on every one of a step's 65 norms."""
    NI, NW = H // (threads * vec), threads // 32

    @T.macro
    def load_weight(w, weight, tid):
        for i in T.unroll(NI):
            for e in T.vectorized(vec):
                w[i * vec + e] = weight[(i * threads + tid) * vec + e]

    @T.macro
    def scale_row(b, tid, v, w, y, part, red):
        red[0] = T.float32(0)
        for i in T.unroll(NI * vec):
            red[0] += T.Cast("float32", v[i]) * T.Cast("float32", v[i])
        for o in T.unroll(5):
            red[0] += _shfl_xor(red[0], tid % 32, 16 >> o)
        if tid % 32 == 0:
            part[tid // 32] = red[0]
        T.tvm_storage_sync("shared")
        red[0] = T.float32(0)
        for k in T.unroll(NW):
            red[0] += part[k]
        red[1] = T.rsqrt(red[0] / T.float32(H) + T.float32(EPS))
        for i in T.unroll(NI):
            for e in T.vectorized(vec):
                y[b, (i * threads + tid) * vec + e] = T.Cast(
                    "float16", T.Cast("float32", v[i * vec + e]) * red[1] * T.Cast("float32", w[i * vec + e]))

    @T.macro
    def norm_rows(x, residual, h, weight, y):
        # One block per row; with `add` (fixed when the function is made), h = x + residual first.
        for b in T.thread_binding(B, thread="blockIdx.x"):
            for tid in T.thread_binding(threads, thread="threadIdx.x"):
                with T.sblock("row"):
                    T.reads()
                    T.writes()
                    w = T.sblock_alloc_buffer((NI * vec,), "float16", scope="local")
                    v = T.sblock_alloc_buffer((NI * vec,), "float16", scope="local")
                    red = T.sblock_alloc_buffer((2,), "float32", scope="local")
                    part = T.sblock_alloc_buffer((NW,), "float32", scope="shared")
                    load_weight(w, weight, tid)
                    for i in T.unroll(NI):
                        if add:
                            for e in T.vectorized(vec):
                                v[i * vec + e] = (x[b, (i * threads + tid) * vec + e]
                                                  + residual[b, (i * threads + tid) * vec + e])
                            for e in T.vectorized(vec):
                                h[b, (i * threads + tid) * vec + e] = v[i * vec + e]
                        else:
                            for e in T.vectorized(vec):
                                v[i * vec + e] = x[b, (i * threads + tid) * vec + e]
                    scale_row(b, tid, v, w, y, part, red)

    if add:
        @T.prim_func(s_tir=True)
        def add_rms_norm(x: T.Buffer((B, H), "float16"), residual: T.Buffer((B, H), "float16"),
                         weight: T.Buffer((H,), "float16"), y: T.Buffer((B, H), "float16"),
                         h: T.Buffer((B, H), "float16")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            norm_rows(x, residual, h, weight, y)
        return add_rms_norm

    @T.prim_func(s_tir=True)
    def rms_norm(x: T.Buffer((B, H), "float16"), weight: T.Buffer((H,), "float16"),
                 y: T.Buffer((B, H), "float16")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        norm_rows(x, x, y, weight, y)   # no residual, no h: the `add` branch is not built
    return rms_norm


def _schedule_cpu(sch, add, lanes):
    ssq = sch.get_sblock("ssq")
    b, k = sch.get_loops(ssq)
    ko, kv = sch.split(k, [None, lanes])
    rf = sch.rfactor(kv, factor_axis=0)   # `lanes` partial sums in a SIMD register
    sch.vectorize(sch.get_loops(rf)[-1])
    if add:
        sch.compute_inline(sch.get_sblock("add"))
    for name in ("norm", "store_h") if add else ("norm",):
        sch.vectorize(sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, lanes])[1])
