"""Rotary position embedding of the new token's query and key heads, and the append of its key
and value rows to the KV cache, in one kernel: q_out = rope(q, p), k_cache[:, p] = rope(k, p),
v_cache[:, p] = v, with p = pos[0].

Arguments: qkv [1, (Hq + 2*Hkv)*D] (query heads, then key heads, then value heads, D each),
pos [1] int32, k_cache [Hkv, C, D], v_cache [Hkv, C, D], q_out [1, Hq, D]. The caches are
contiguous per layer (see decode_attention.py: one sequence at batch 1 needs no page table) and
`pos` lives on the device, so every shape is static and a CUDA graph can capture the step. Relax
calls this with call_tir_inplace: outputs k_cache (in place, argument 2), v_cache (argument 3)
and q_out (new). A position at or past the capacity writes nothing.

RoPE in Hugging Face's rotate_half convention, angles and products in fp32: for i < D/2 and
f_i = theta^(-2i/D), out[i] = x[i] cos(p f_i) - x[i+D/2] sin(p f_i) and
out[i+D/2] = x[i+D/2] cos(p f_i) + x[i] sin(p f_i)."""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from . import register
from .template import Template, target_is_gpu

I32 = "int32"   # a name, not a string, in annotations (pyflakes reads strings as names)


class Inputs(list):
    """The kernel's arguments, plus the workload they were made for: the reference needs theta,
    which no argument's shape tells."""

    def __init__(self, arrays, wl: dict):
        super().__init__(arrays)
        self.wl = wl


def _dims(wl):
    return wl["q_heads"], wl["kv_heads"], wl["head_dim"], wl["capacity"], wl["dtype"]


def _freq_exponent(wl) -> float:
    """f_i = exp2(i * this): theta^(-2i/D) with one fp32 multiply and one exp2 on the device."""
    return -2.0 * math.log2(wl["theta"]) / wl["head_dim"]


def _compute(wl):
    Hq, Hkv, D, C, dt = _dims(wl)
    half, E = D // 2, _freq_exponent(wl)

    def rope(qkv, base, d, p):   # element d of the head starting at qkv[0, base]
        ang = T.Cast("float32", p) * T.exp2(T.Cast("float32", d % half) * T.float32(E))
        other = T.if_then_else(d < half, -T.Cast("float32", qkv[0, base + d + half]),
                               T.Cast("float32", qkv[0, base + d - half]))
        return T.Cast(dt, T.Cast("float32", qkv[0, base + d]) * T.cos(ang) + other * T.sin(ang))

    @T.prim_func(s_tir=True)
    def rope_kv_append(qkv: T.Buffer((1, (Hq + 2 * Hkv) * D), dt), pos: T.Buffer((1,), I32),
                       k_cache: T.Buffer((Hkv, C, D), dt), v_cache: T.Buffer((Hkv, C, D), dt),
                       q_out: T.Buffer((1, Hq, D), dt)):
        T.func_attr({"tirx.noalias": True})
        for h, d in T.grid(Hq, D):
            with T.sblock("q_rope"):
                vh, vd = T.axis.remap("SS", [h, d])
                q_out[0, vh, vd] = rope(qkv, vh * D, vd, pos[0])
        for h, d in T.grid(Hkv, D):
            with T.sblock("k_rope"):
                vh, vd = T.axis.remap("SS", [h, d])
                if pos[0] < C:
                    k_cache[vh, pos[0], vd] = rope(qkv, (Hq + vh) * D, vd, pos[0])
        for h, d in T.grid(Hkv, D):
            with T.sblock("v_append"):
                vh, vd = T.axis.remap("SS", [h, d])
                if pos[0] < C:
                    v_cache[vh, pos[0], vd] = qkv[0, (Hq + Hkv + vh) * D + vd]

    return rope_kv_append


def rotate_and_append_macro(wl, vec: int):
    """The work of one thread of the GPU kernels (this one, and prefill_rope_kv_append's per token):
    `vec` rotation pairs (i0 + e, i0 + e + D/2) of head h of token row t of qkv, at position p, read
    into the local buffers lo and hi, rotated (query and key heads) and stored to q_out or the caches."""
    Hq, Hkv, D, C, dt = _dims(wl)
    NH, half, E = Hq + 2 * Hkv, D // 2, _freq_exponent(wl)

    @T.macro
    def rotate_and_append(qkv, k_cache, v_cache, q_out, lo, hi, t, h, i0, p):
        if h < NH and (h < Hq or p < C):
            for e in T.vectorized(vec):
                lo[e] = qkv[t, h * D + i0 + e]
            for e in T.vectorized(vec):
                hi[e] = qkv[t, h * D + half + i0 + e]
            if h < Hq + Hkv:   # query and key heads rotate; value heads are copied
                for e in T.unroll(vec):
                    ang: T.let[T.float32] = (T.Cast("float32", p)
                                             * T.exp2(T.Cast("float32", i0 + e) * T.float32(E)))
                    x0: T.let[T.float32] = T.Cast("float32", lo[e])
                    x1: T.let[T.float32] = T.Cast("float32", hi[e])
                    lo[e] = T.Cast(dt, x0 * T.cos(ang) - x1 * T.sin(ang))
                    hi[e] = T.Cast(dt, x1 * T.cos(ang) + x0 * T.sin(ang))
            if h < Hq:
                for e in T.vectorized(vec):
                    q_out[t, h, i0 + e] = lo[e]
                for e in T.vectorized(vec):
                    q_out[t, h, half + i0 + e] = hi[e]
            elif h < Hq + Hkv:
                for e in T.vectorized(vec):
                    k_cache[h - Hq, p, i0 + e] = lo[e]
                for e in T.vectorized(vec):
                    k_cache[h - Hq, p, half + i0 + e] = hi[e]
            else:
                for e in T.vectorized(vec):
                    v_cache[h - Hq - Hkv, p, i0 + e] = lo[e]
                for e in T.vectorized(vec):
                    v_cache[h - Hq - Hkv, p, half + i0 + e] = hi[e]

    return rotate_and_append


def _gpu_func(wl, vec: int, heads_per_block: int):
    """A thread per `vec` rotation pairs (i, i + D/2) of a head: two vector loads, two stores."""
    Hq, Hkv, D, C, dt = _dims(wl)
    NH, TPH = Hq + 2 * Hkv, D // 2 // vec     # heads, threads per head
    rotate_and_append = rotate_and_append_macro(wl, vec)

    @T.prim_func(s_tir=True)
    def rope_kv_append_gpu(qkv: T.Buffer((1, (Hq + 2 * Hkv) * D), dt), pos: T.Buffer((1,), I32),
                           k_cache: T.Buffer((Hkv, C, D), dt), v_cache: T.Buffer((Hkv, C, D), dt),
                           q_out: T.Buffer((1, Hq, D), dt)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for b in T.thread_binding(-(-NH // heads_per_block), thread="blockIdx.x"):
            for tid in T.thread_binding(heads_per_block * TPH, thread="threadIdx.x"):
                with T.sblock("rope"):
                    T.reads()   # declared empty: the inferred regions would name the lets below
                    T.writes()
                    lo = T.sblock_alloc_buffer((vec,), dt, scope="local")
                    hi = T.sblock_alloc_buffer((vec,), dt, scope="local")
                    h: T.let[T.int32] = b * heads_per_block + tid // TPH
                    i0: T.let[T.int32] = tid % TPH * vec
                    p: T.let[T.int32] = pos[0]
                    rotate_and_append(qkv, k_cache, v_cache, q_out, lo, hi, 0, h, i0, p)

    return rope_kv_append_gpu


@register
class RopeKVAppend(Template):
    name = "rope_kv_append"
    gpu_knobs = {
        "vec": [1, 2, 4, 8],               # rotation pairs per thread (8 fp16 = 16-byte accesses)
        "heads_per_block": [1, 2, 4, 8],   # heads (query, key or value) per thread block
    }
    cpu_knobs = {
        "parallel": ["none", "heads"],     # split the heads over the cores, or not (tiny work)
    }
    tolerance = 2e-3

    def output_specs(self, wl):
        # The new output only: k_cache and v_cache (arguments 2 and 3) are updated in place.
        return [((1, wl["q_heads"], wl["head_dim"]), wl["dtype"])]

    def compute(self, wl):
        return _compute(wl)

    def check(self, wl, knobs, target):
        if not target_is_gpu(target):
            return None
        D, itemsize, vec = wl["head_dim"], np.dtype(wl["dtype"]).itemsize, knobs["vec"]
        if vec * itemsize > 16:
            return "vec * itemsize must be at most 16 bytes"
        if (D // 2) % vec:
            return "vec must divide head_dim / 2"
        if knobs["heads_per_block"] * (D // 2 // vec) > int(target.attrs.get("max_threads_per_block", 1024)):
            return "too many threads"
        return None

    def default_knobs(self, wl, target):
        if not target_is_gpu(target):
            return {"parallel": "none"}
        # Widest accesses; about 64 threads a block, so the few heads spread over several SMs.
        for vec in (8, 4, 2, 1):
            for hpb in (8, 4, 2, 1):
                knobs = {"vec": vec, "heads_per_block": hpb}
                if self.check(wl, knobs, target) is None and hpb * (wl["head_dim"] // 2 // vec) <= 64:
                    return knobs
        return {"vec": 1, "heads_per_block": 1}

    def schedule(self, wl, knobs, target):
        if target_is_gpu(target):
            return tvm.IRModule({"main": _gpu_func(wl, **knobs)})
        sch = s_tir.Schedule(tvm.IRModule({"main": self.compute(wl)}))
        if knobs["parallel"] == "heads":
            for name in ("q_rope", "k_rope", "v_append"):
                sch.parallel(sch.get_loops(sch.get_sblock(name))[0])
        return sch.mod

    def inputs(self, wl, rng):
        # The last row of the cache: the largest angles, and a write at the edge of the buffer.
        Hq, Hkv, D, C, dt = _dims(wl)
        qkv = rng.standard_normal((1, (Hq + 2 * Hkv) * D)).astype(dt)
        k = rng.standard_normal((Hkv, C, D)).astype(dt)
        v = rng.standard_normal((Hkv, C, D)).astype(dt)
        return Inputs([qkv, np.array([C - 1], np.int32), k, v, np.zeros((1, Hq, D), dt)], wl)

    def reference(self, inputs):
        """[k_cache, v_cache, q_out] after the call (the caches are updated copies).
        `inputs` as inputs() made them (they carry the workload's theta)."""
        qkv, pos, k, v, q_out = inputs
        Hq, Hkv, D = q_out.shape[1], k.shape[0], k.shape[2]
        p, half, theta = int(pos[0]), D // 2, inputs.wl["theta"]
        heads = qkv.reshape(Hq + 2 * Hkv, D).astype(np.float32)
        # As Hugging Face computes it: inv_freq, angles, cos/sin and products in fp32.
        inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D))))
        ang = np.float32(p) * inv_freq.astype(np.float32)
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        x0, x1 = heads[:Hq + Hkv, :half], heads[:Hq + Hkv, half:]
        rot = np.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=1).astype(k.dtype)
        k, v = k.copy(), v.copy()
        if p < k.shape[1]:
            k[:, p], v[:, p] = rot[Hq:], heads[Hq + Hkv:].astype(v.dtype)
        return [k, v, rot[:Hq].reshape(q_out.shape)]

    def relative_error(self, inputs, run):
        """All three outputs are poisoned with NaN: row p of the caches and q_out must match the
        reference, and every other row of the caches must still be NaN (nothing else written)."""
        k_ref, v_ref, q_ref = self.reference(inputs)
        k_out, v_out, q_out = run(3)
        rows = [int(inputs[1][0])] if inputs[1][0] < k_ref.shape[1] else []   # none past the capacity
        if not all(np.isnan(np.delete(out, rows, axis=1).astype(np.float32)).all() for out in (k_out, v_out)):
            return float("nan")
        worst = 0.0
        for out, ref in ((k_out[:, rows], k_ref[:, rows]), (v_out[:, rows], v_ref[:, rows]), (q_out, q_ref)):
            ref = ref.astype(np.float64)
            err = np.linalg.norm(out.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30)
            if not np.isfinite(err):
                return float("nan")
            worst = max(worst, float(err))
        return worst

    def bytes_moved(self, wl):
        Hq, Hkv, D = wl["q_heads"], wl["kv_heads"], wl["head_dim"]
        return np.dtype(wl["dtype"]).itemsize * 2 * (Hq + 2 * Hkv) * D + 4
