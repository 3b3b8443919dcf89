"""rope_kv_append for a prompt of n tokens: token t sits at position p = pos[0] + t, its query
heads are rotated into q_out[t], its key heads rotated into k_cache[:, p] and its value heads
copied into v_cache[:, p]. A position at or past the capacity writes no cache row.

Arguments: qkv [n, (Hq + 2*Hkv)*D] (each row as in rope_kv_append: query, key, value heads),
pos [1] int32 (the first token's position), k_cache, v_cache [Hkv, C, D] (updated in place,
call_tir_inplace arguments 2 and 3), q_out [n, Hq, D] (new; the layout prefill_attention reads).
Workload: rope_kv_append's keys (q_heads, kv_heads, head_dim, capacity, dtype, theta) plus n, the
tokens; optional pos0, the first position the inputs use (tuning and tests).

Everything per token is rope_kv_append's: the rotate-half convention, angles in fp32 from the
same f_i = exp2(i * E) (its _freq_exponent), its knobs and checks (this template subclasses it),
and its NumPy reference, applied token by token. The GPU kernel adds the token as blockIdx.y."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from . import register
from .rope_kv_append import I32, Inputs, RopeKVAppend, _dims, _freq_exponent, rotate_and_append_macro
from .template import target_is_gpu


def _compute(wl):
    Hq, Hkv, D, C, dt = _dims(wl)
    n, half, E = wl["n"], D // 2, _freq_exponent(wl)

    def rope(qkv, t, base, d, p):   # element d of the head starting at qkv[t, base]
        ang = T.Cast("float32", p) * T.exp2(T.Cast("float32", d % half) * T.float32(E))
        other = T.if_then_else(d < half, -T.Cast("float32", qkv[t, base + d + half]),
                               T.Cast("float32", qkv[t, base + d - half]))
        return T.Cast(dt, T.Cast("float32", qkv[t, base + d]) * T.cos(ang) + other * T.sin(ang))

    @T.prim_func(s_tir=True)
    def prefill_rope_kv_append(qkv: T.Buffer((n, (Hq + 2 * Hkv) * D), dt), pos: T.Buffer((1,), I32),
                               k_cache: T.Buffer((Hkv, C, D), dt), v_cache: T.Buffer((Hkv, C, D), dt),
                               q_out: T.Buffer((n, Hq, D), dt)):
        T.func_attr({"tirx.noalias": True})
        for t, h, d in T.grid(n, Hq, D):
            with T.sblock("q_rope"):
                vt, vh, vd = T.axis.remap("SSS", [t, h, d])
                q_out[vt, vh, vd] = rope(qkv, vt, vh * D, vd, pos[0] + vt)
        for t, h, d in T.grid(n, Hkv, D):
            with T.sblock("k_rope"):
                vt, vh, vd = T.axis.remap("SSS", [t, h, d])
                if pos[0] + vt < C:
                    k_cache[vh, pos[0] + vt, vd] = rope(qkv, vt, (Hq + vh) * D, vd, pos[0] + vt)
        for t, h, d in T.grid(n, Hkv, D):
            with T.sblock("v_append"):
                vt, vh, vd = T.axis.remap("SSS", [t, h, d])
                if pos[0] + vt < C:
                    v_cache[vh, pos[0] + vt, vd] = qkv[vt, (Hq + Hkv + vh) * D + vd]

    return prefill_rope_kv_append


def _gpu_func(wl, vec: int, heads_per_block: int):
    """rope_kv_append's kernel with the token on blockIdx.y: a thread per `vec` rotation pairs
    (i, i + D/2) of a head, two vector loads and two vector stores."""
    Hq, Hkv, D, C, dt = _dims(wl)
    n, NH, TPH = wl["n"], Hq + 2 * Hkv, D // 2 // vec     # tokens, heads, threads per head
    rotate_and_append = rotate_and_append_macro(wl, vec)

    @T.prim_func(s_tir=True)
    def prefill_rope_kv_append_gpu(qkv: T.Buffer((n, (Hq + 2 * Hkv) * D), dt), pos: T.Buffer((1,), I32),
                                   k_cache: T.Buffer((Hkv, C, D), dt), v_cache: T.Buffer((Hkv, C, D), dt),
                                   q_out: T.Buffer((n, Hq, D), dt)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for b in T.thread_binding(-(-NH // heads_per_block), thread="blockIdx.x"):
            for t in T.thread_binding(n, thread="blockIdx.y"):
                for tid in T.thread_binding(heads_per_block * TPH, thread="threadIdx.x"):
                    with T.sblock("rope"):
                        T.reads()   # declared empty: the inferred regions would name the lets below
                        T.writes()
                        lo = T.sblock_alloc_buffer((vec,), dt, scope="local")
                        hi = T.sblock_alloc_buffer((vec,), dt, scope="local")
                        h: T.let[T.int32] = b * heads_per_block + tid // TPH
                        i0: T.let[T.int32] = tid % TPH * vec
                        p: T.let[T.int32] = pos[0] + t
                        rotate_and_append(qkv, k_cache, v_cache, q_out, lo, hi, t, h, i0, p)

    return prefill_rope_kv_append_gpu


@register
class PrefillRopeKVAppend(RopeKVAppend):
    name = "prefill_rope_kv_append"
    # GPU knobs and their check(): rope_kv_append's (the per-token work is the same).
    cpu_knobs = {
        "parallel": ["none", "tokens"],    # tokens over the cores, or not
    }

    def output_specs(self, wl):
        return [((wl["n"], wl["q_heads"], wl["head_dim"]), wl["dtype"])]

    def compute(self, wl):
        return _compute(wl)

    def default_knobs(self, wl, target):
        if not target_is_gpu(target):
            return {"parallel": "tokens" if wl["n"] > 1 else "none"}
        return super().default_knobs(wl, target)

    def schedule(self, wl, knobs, target):
        if target_is_gpu(target):
            return tvm.IRModule({"main": _gpu_func(wl, **knobs)})
        sch = s_tir.Schedule(tvm.IRModule({"main": self.compute(wl)}))
        for name in ("q_rope", "k_rope", "v_append"):
            t, h, d = sch.get_loops(sch.get_sblock(name))
            if knobs["parallel"] == "tokens":
                sch.parallel(t)
            sch.vectorize(sch.split(d, [None, 4])[1])   # the contiguous head elements
        return sch.mod

    def inputs(self, wl, rng):
        # By default the prompt ends at the last row of the cache (the largest angles, writes at
        # the edge of the buffer); pos0 in the workload says otherwise.
        Hq, Hkv, D, C, dt = _dims(wl)
        n = wl["n"]
        pos0 = wl.get("pos0", max(0, C - n))
        qkv = rng.standard_normal((n, (Hq + 2 * Hkv) * D)).astype(dt)
        k = rng.standard_normal((Hkv, C, D)).astype(dt)
        v = rng.standard_normal((Hkv, C, D)).astype(dt)
        return Inputs([qkv, np.array([pos0], np.int32), k, v, np.zeros((n, Hq, D), dt)], wl)

    def reference(self, inputs):
        """[k_cache, v_cache, q_out] after the call: rope_kv_append's reference, token by token."""
        qkv, pos, k, v, q_out = inputs
        n, Hq, D = q_out.shape
        Hkv, C = k.shape[:2]
        k, v, q_out = k.copy(), v.copy(), q_out.copy()
        # Each token's query and key heads go through rope_kv_append's reference as query heads
        # of a model without KV heads: its exact arithmetic, without copying the caches per token.
        no_cache = np.zeros((0, 0, D), k.dtype)
        for t in range(n):
            p = int(pos[0]) + t
            one = Inputs([qkv[t:t + 1, :(Hq + Hkv) * D], np.array([p], np.int32), no_cache, no_cache,
                          np.zeros((1, Hq + Hkv, D), q_out.dtype)], inputs.wl)
            rot = super().reference(one)[2][0]
            q_out[t] = rot[:Hq]
            if p < C:
                k[:, p] = rot[Hq:]
                v[:, p] = qkv[t, (Hq + Hkv) * D:].reshape(Hkv, D)
        return [k, v, q_out]

    def relative_error(self, inputs, run):
        """As rope_kv_append's: rows pos0 .. pos0 + n - 1 of the caches (those below the capacity)
        and q_out must match, every other cache row must still hold the NaN it was poisoned with."""
        k_ref, v_ref, q_ref = self.reference(inputs)
        k_out, v_out, q_out = run(3)
        C = k_ref.shape[1]
        rows = [p for p in range(int(inputs[1][0]), int(inputs[1][0]) + q_ref.shape[0]) if p < C]
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
        return wl["n"] * (super().bytes_moved(wl) - 4) + 4
