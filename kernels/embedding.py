"""Embedding lookup for n tokens: out[i, :] = table[ids[i], :], from an fp16 (or fp32) table
[V, H], or dequantised on the fly from a q4f16_1 table (uint32 words [V, H/8], nibble e of word
w = element 8w + e, fp16 scales [V, H/32]; value (q - 7) * scale, as in q4_gemv.py).

Workload: {"n": tokens (1..512), "vocab": V, "H": hidden size (as the norm templates name it),
"quant": "q0f16" | "q4f16_1" | "q0f32"}. Arguments: ids [n] int32, the table (q0: table; q4:
words, scales), then out [n, H]. Ids are trusted (the tokenizer's): no bounds check.

A memory copy: the compute walks each row as words of 8 elements (loops i, w, e) for both
quantisations, so one schedule serves both: a thread handles `vec` elements of a word (8 fp16 =
one 16-byte store; for q4 one 4-byte word read), threads of a block run along the row and blocks
over (token, row chunk). The dequantisation is in fp32 and rounded once to fp16, which equals
the fp16 product (q - 7 and the scale are exact in fp16)."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T

from . import register
from .q4_gemv import GROUP, dequantize
from .template import Template, target_is_gpu

I32, U32, F16 = "int32", "uint32", "float16"   # names, not strings, in annotations (pyflakes)


def _dtype(wl) -> str:
    return "float32" if wl["quant"] == "q0f32" else "float16"


def _compute(wl):
    n, V, H, dt = wl["n"], wl["vocab"], wl["H"], _dtype(wl)
    W = H // 8

    if wl["quant"] == "q4f16_1":
        @T.prim_func(s_tir=True)
        def embedding_q4(ids: T.Buffer((n,), I32), wq: T.Buffer((V, W), U32),
                         scale: T.Buffer((V, H // GROUP), F16), out: T.Buffer((n, H), F16)):
            T.func_attr({"tirx.noalias": True})
            for i, w, e in T.grid(n, W, 8):
                with T.sblock("lookup"):
                    vi, vw, ve = T.axis.remap("SSS", [i, w, e])
                    out[vi, vw * 8 + ve] = T.Cast("float16", (
                        T.Cast("float32", (wq[ids[vi], vw] >> T.Cast("uint32", ve * 4)) & T.uint32(15))
                        - T.float32(7)) * T.Cast("float32", scale[ids[vi], vw * 8 // GROUP]))
        return embedding_q4

    @T.prim_func(s_tir=True)
    def embedding(ids: T.Buffer((n,), I32), table: T.Buffer((V, H), dt), out: T.Buffer((n, H), dt)):
        T.func_attr({"tirx.noalias": True})
        for i, w, e in T.grid(n, W, 8):
            with T.sblock("lookup"):
                vi, vw, ve = T.axis.remap("SSS", [i, w, e])
                out[vi, vw * 8 + ve] = table[ids[vi], vw * 8 + ve]
    return embedding


@register
class Embedding(Template):
    name = "embedding"
    gpu_knobs = {
        "threads": [64, 128, 256, 512],    # threads per block, along the row
        "vec": [1, 2, 4, 8],               # elements per thread (8 fp16 = 16-byte stores)
    }
    cpu_knobs = {
        "parallel": ["none", "tokens"],    # rows over the cores, or not (n = 1 is tiny)
    }
    tolerance = 1e-3

    def output_specs(self, wl):
        return [((wl["n"], wl["H"]), _dtype(wl))]

    def compute(self, wl):
        return _compute(wl)

    def check(self, wl, knobs, target):
        if wl["H"] % (GROUP if wl["quant"] == "q4f16_1" else 8):
            return "H must be a multiple of 8 (q4f16_1: of the group size 32)"
        if not target_is_gpu(target):
            return None
        if knobs["vec"] * np.dtype(_dtype(wl)).itemsize > 16:
            return "vec * itemsize must be at most 16 bytes"
        if knobs["threads"] > int(target.attrs.get("max_threads_per_block", 1024)):
            return "too many threads"
        return None

    def default_knobs(self, wl, target):
        if not target_is_gpu(target):
            return {"parallel": "tokens" if wl["n"] > 1 else "none"}
        # 16-byte stores; a block covers about one row (fewer idle threads on short rows).
        vec = 16 // np.dtype(_dtype(wl)).itemsize
        threads = max(64, min(512, 1 << (wl["H"] // vec - 1).bit_length()))
        return {"threads": threads, "vec": vec}

    def schedule(self, wl, knobs, target):
        sch = s_tir.Schedule(tvm.IRModule({"main": self.compute(wl)}))
        blk = sch.get_sblock("lookup")
        i, w, e = sch.get_loops(blk)
        if target_is_gpu(target):
            eo, ev = sch.split(e, [None, knobs["vec"]])
            # Row chunks of threads * vec elements: consecutive threads, consecutive addresses.
            # The guard of a partial chunk lands outside the vector loop.
            bx, tx = sch.split(sch.fuse(w, eo), [None, knobs["threads"]])
            sch.bind(sch.fuse(i, bx), "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
            if wl["quant"] == "q4f16_1" and knobs["vec"] > 1:
                # Dequantise element by element into registers, then one vector store: TVM's
                # CUDA codegen cannot vectorise the fp32 math 8 wide (it packs 8 floats into a
                # ulonglong4, which does not compile).
                store = sch.cache_write(blk, 0, "local")
                sch.reverse_compute_at(store, tx)
                sch.vectorize(sch.get_loops(store)[-1])
                sch.unroll(ev)
            else:
                sch.vectorize(ev)
        else:
            if knobs["parallel"] == "tokens":
                sch.parallel(i)
            sch.vectorize(e)
        return sch.mod

    def inputs(self, wl, rng):
        n, V, H, dt = wl["n"], wl["vocab"], wl["H"], _dtype(wl)
        ids = rng.integers(0, V, n).astype(np.int32)
        ids[:2] = [V - 1, 0][:n]              # the ends of the table
        if wl["quant"] == "q4f16_1":
            wq = rng.integers(0, 1 << 32, (V, H // 8), dtype=np.uint32)   # 8 uniform nibbles a word
            scale = (rng.random((V, H // GROUP), dtype=np.float32) * 0.02 + 0.005).astype(np.float16)
            return [ids, wq, scale, np.zeros((n, H), np.float16)]
        return [ids, rng.standard_normal((V, H), dtype=np.float32).astype(dt), np.zeros((n, H), dt)]

    def reference(self, inputs):
        ids = inputs[0]
        if len(inputs) == 4:    # q4f16_1: words, scales
            return dequantize(inputs[1][ids], inputs[2][ids]).astype(np.float16)
        return inputs[1][ids]

    def bytes_moved(self, wl):
        n, H = wl["n"], wl["H"]
        row = H // 2 + H // GROUP * 2 if wl["quant"] == "q4f16_1" else H * np.dtype(_dtype(wl)).itemsize
        return n * (4 + row + H * np.dtype(_dtype(wl)).itemsize)
