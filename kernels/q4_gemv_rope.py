"""q4f16_1 QKV GEMV with the rotary embedding and the KV-cache append in its epilogue: the
projection, then q_out = rope(q, p), k_cache[:, p] = rope(k, p), v_cache[:, p] = v with
p = pos[0], in one kernel instead of two (a 7B step ran 32 RoPE kernels of 1.5 us).

RoPE rotates element d of a head with element d + D/2, so one thread owns both rows of each
pair: the pair axis of the GEMV schedules (as SiLU(gate) * up owns a gate and an up row), here
rows hD + d and hD + d + D/2 of head h. The rotation works on the fp32 sums (the separate
kernel rotates the fp16 projection). Arguments: x [B=1, K], the q4 weight and scales of the
[Hq + 2 Hkv] x D rows (query heads, key heads, value heads), pos [1] int32, k_cache and
v_cache [Hkv, C, D] (updated in place, as rope_kv_append.py does), then q_out [1, Hq, D].
The GEMV part, its knobs and schedules are q4f16_1_gemv's; the rotation is rope_kv_append's.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from . import register
from .gemv_schedule import schedule_gemv_cpu, schedule_gemv_gpu
from .q4_gemv import GROUP, Q4Gemv, dequantize
from .rope_kv_append import I32, Inputs, RopeKVAppend, _freq_exponent
from .template import target_is_gpu


def q4_rope_compute(wl: dict, decode: str):
    K, D, C, dt = wl["K"], wl["head_dim"], wl["capacity"], wl["dtype"]
    Hq, Hkv = wl["q_heads"], wl["kv_heads"]
    N, half, E = (Hq + 2 * Hkv) * D, D // 2, _freq_exponent(wl)
    NO = N // 2   # rotation pairs

    def row(i, j):   # weight row of member j of pair i
        return i // half * D + j * half + i % half

    def rotated(acc, i, j, p):   # member j of pair i, rotated by position p's angle
        ang = T.Cast("float32", p) * T.exp2(T.Cast("float32", i % half) * T.float32(E))
        if j == 0:
            return T.Cast(dt, acc[0, i * 2] * T.cos(ang) - acc[0, i * 2 + 1] * T.sin(ang))
        return T.Cast(dt, acc[0, i * 2 + 1] * T.cos(ang) + acc[0, i * 2] * T.sin(ang))

    @T.prim_func(s_tir=True)
    def q4_gemv_rope(x: T.Buffer((1, K), "float16"), wq: T.Buffer((N, K // 8), "uint32"),
                     scale: T.Buffer((N, K // GROUP), "float16"), pos: T.Buffer((1,), I32),
                     k_cache: T.Buffer((Hkv, C, D), dt), v_cache: T.Buffer((Hkv, C, D), dt),
                     q_out: T.Buffer((1, Hq, D), dt)):
        T.func_attr({"tirx.noalias": True})
        acc = T.sblock_alloc_buffer((1, N), "float32")
        if decode == "f16x2":
            for b, i, j, k in T.grid(1, NO, 2, K // 8):
                with T.sblock("gemv"):
                    vb, vi, vj, vw = T.axis.remap("SSSR", [b, i, j, k])
                    with T.init():
                        acc[vb, vi * 2 + vj] = T.float32(0)
                    acc[vb, vi * 2 + vj] += T.call_pure_extern(
                        "float32", "st_q4_dot8", wq[row(vi, vj), vw],
                        x[vb, vw * 8], x[vb, vw * 8 + 1], x[vb, vw * 8 + 2], x[vb, vw * 8 + 3],
                        x[vb, vw * 8 + 4], x[vb, vw * 8 + 5], x[vb, vw * 8 + 6], x[vb, vw * 8 + 7],
                    ) * T.Cast("float32", scale[row(vi, vj), vw // 4])
        else:
            w = T.sblock_alloc_buffer((N, K), "float32")
            for n, k in T.grid(N, K):
                with T.sblock("decode"):
                    vn, vk = T.axis.remap("SS", [n, k])
                    # the nibble as the mantissa of 2**23: an exact int->float (q4_gemv.py)
                    w[vn, vk] = (T.reinterpret("float32", (wq[vn, vk // 8] >> T.Cast("uint32", vk % 8 * 4))
                                               & T.uint32(15) | T.uint32(0x4B000000))
                                 - T.float32(8388615.0)) * T.Cast("float32", scale[vn, vk // GROUP])
            for b, i, j, k in T.grid(1, NO, 2, K):
                with T.sblock("gemv"):
                    vb, vi, vj, vk = T.axis.remap("SSSR", [b, i, j, k])
                    with T.init():
                        acc[vb, vi * 2 + vj] = T.float32(0)
                    acc[vb, vi * 2 + vj] += T.Cast("float32", x[vb, vk]) * w[row(vi, vj), vk]
        for b, i in T.grid(1, NO):
            with T.sblock("epilogue"):
                vb, vi = T.axis.remap("SS", [b, i])
                if vi // half < Hq:
                    q_out[0, vi // half, vi % half] = rotated(acc, vi, 0, pos[0])
                    q_out[0, vi // half, vi % half + half] = rotated(acc, vi, 1, pos[0])
                elif vi // half < Hq + Hkv:
                    if pos[0] < C:
                        k_cache[vi // half - Hq, pos[0], vi % half] = rotated(acc, vi, 0, pos[0])
                        k_cache[vi // half - Hq, pos[0], vi % half + half] = rotated(acc, vi, 1, pos[0])
                elif pos[0] < C:   # value heads are copied
                    v_cache[vi // half - Hq - Hkv, pos[0], vi % half] = T.Cast(dt, acc[0, vi * 2])
                    v_cache[vi // half - Hq - Hkv, pos[0], vi % half + half] = T.Cast(dt, acc[0, vi * 2 + 1])
    return q4_gemv_rope


@register
class Q4GemvRope(Q4Gemv):
    name = "q4f16_1_gemv_rope"
    epilogue = "rope"
    #: the tuner starts from, and a build without records of its own takes, the plain GEMV's knobs
    warm_start_from = "q4f16_1_gemv"
    dlight_baseline = False   # dlight's GEMV rules know no epilogue that writes the caches in place

    def outputs(self, wl) -> int:   # what a thread block's rows are counted in: rotation pairs
        return wl["N"] // 2

    def output_specs(self, wl):
        return [((1, wl["q_heads"], wl["head_dim"]), wl["dtype"])]   # the caches are updated in place

    def compute(self, wl, decode: str = "f32"):
        return q4_rope_compute(wl, decode)

    def check(self, wl, knobs, target):
        if wl["batch"] != 1 or wl["N"] != (wl["q_heads"] + 2 * wl["kv_heads"]) * wl["head_dim"]:
            return "batch 1, and N must be (q_heads + 2 kv_heads) * head_dim"
        return super().check(wl, knobs, target)

    def schedule(self, wl, knobs, target):
        decode = knobs.get("decode", "f32") if target_is_gpu(target) else "f32"
        sch = s_tir.Schedule(tvm.IRModule({"main": self.compute(wl, decode)}))
        if decode == "f32":
            sch.compute_inline(sch.get_sblock("decode"))
        if target_is_gpu(target):
            schedule_gemv_gpu(sch, "wq", per_step=8 if decode == "f32" else 1,
                              **{k: v for k, v in knobs.items() if k != "decode"})
        else:
            schedule_gemv_cpu(sch, **knobs)
        return sch.mod

    def _rope_workload(self, wl):
        return {k: wl[k] for k in ("batch", "q_heads", "kv_heads", "head_dim", "capacity", "dtype", "theta")}

    def inputs(self, wl, rng):
        x, wq, scale, _ = super().inputs({**wl, "batch": 1}, rng)
        rope_inputs = RopeKVAppend().inputs(self._rope_workload(wl), rng)   # pos, the caches, q_out
        return Inputs([x, wq, scale, *rope_inputs[1:]], self._rope_workload(wl))

    def _as_rope_inputs(self, inputs):
        """rope_kv_append's arguments for the same call: the projection in fp32 (not rounded to
        fp16 first, as this kernel rotates its fp32 sums), then pos, the caches, q_out."""
        x, wq, scale = inputs[:3]
        qkv = x.astype(np.float32) @ dequantize(wq, scale).T
        return Inputs([qkv, *inputs[3:]], inputs.wl)

    def reference(self, inputs):
        return RopeKVAppend().reference(self._as_rope_inputs(inputs))

    def relative_error(self, inputs, run):
        """rope_kv_append's check (row p of each cache and q_out against the reference, every other
        cache row untouched) on this kernel's outputs."""
        return RopeKVAppend().relative_error(self._as_rope_inputs(inputs), run)

    def bytes_moved(self, wl):
        N, K = wl["N"], wl["K"]
        return N * K // 2 + N * (K // GROUP) * 2 + K * 2 + N * 2 + 4   # weights, x, q_out and the K/V rows
