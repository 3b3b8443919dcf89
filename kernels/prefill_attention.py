"""Causal attention for a short prompt of n tokens (up to a few hundred) with grouped-query
attention, over one shard's KV cache: token t sits at position pos[0] + t and attends to cache
positions 0 .. pos[0] + t. Query head h reads KV head h // (Hq / Hkv).

Layouts are decode_attention's, so the two share the cache and the surrounding code: k_cache,
v_cache [Hkv, C, D] already holding the prompt's rows (prefill_rope_kv_append writes them just
before), pos [1] int32 on the device (the first token's position; static shapes), q [n, Hq, D]
(prefill_rope_kv_append's q_out), out [n, Hq*D] (decode_attention's rows, n of them). No scratch:
one block covers a query row's whole length. Softmax scale 1/sqrt(D), fp32 scores and sums.
Workload: n, q_heads, kv_heads, head_dim, capacity, dtype (decode_attention's keys, plus n);
optional pos0, the first position the inputs use (tuning and tests; default 0, an empty cache).

GPU: flash attention on CUDA cores, written directly as TIR with explicit thread bindings (the
lengths depend on pos at run time, which schedule primitives handle poorly). The query rows of
a KV head are the pairs (token, query head of its group), token-major; a block takes `rows`
* threads / tpt consecutive ones of one KV head, so each K/V tile it stages in shared memory
serves every query head of the group (read once per block, not once per query head), and its
rows' lengths differ by a few tokens only. A row belongs to `tpt` neighbouring lanes, each with a
D/tpt slice of q and of the accumulator in registers; a score is a partial dot product summed
by warp shuffles. Per key tile (16-byte loads into shared memory, rows past the block's longest
length zero-filled): scores into registers, one online-softmax rescale per row, then the
weighted V rows; base-2 exponentials. Not done, to keep the code small: tensor cores (mma), which
would raise the ceiling at longer prompts, and splitting a row's length over several blocks as
decode_attention does, which a short prompt after a long context (few blocks) would want.
CPU: one (token, query head) per parallel iteration, online softmax over tiles of scores."""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm.script import tirx as T

from . import register
from .decode_attention import NEG, _log2, online_softmax_row_macro, shfl
from .template import Template, target_is_gpu

I32 = "int32"   # a name, not a string, in annotations (pyflakes reads strings as names)


def _dims(wl):
    return wl["n"], wl["q_heads"], wl["kv_heads"], wl["head_dim"], wl["capacity"], wl.get("dtype", "float16")


def _vec(dt) -> int:
    return 16 // np.dtype(dt).itemsize        # elements of a 16-byte load


def _cpu_func(wl: dict, tile: int, parallel: bool):
    n, Hq, Hkv, D, C, dt = _dims(wl)
    loop = T.parallel if parallel else T.serial
    online_softmax_row = online_softmax_row_macro(D, Hq // Hkv, tile, dt)

    @T.prim_func(s_tir=True)
    def prefill_attention(q: T.Buffer((n, Hq, D), dt), k_cache: T.Buffer((Hkv, C, D), dt),
                          v_cache: T.Buffer((Hkv, C, D), dt), pos: T.Buffer((1,), I32),
                          out: T.Buffer((n, Hq * D), dt)):
        T.func_attr({"tirx.noalias": True})
        for th in loop(n * Hq):
            with T.sblock("attn"):
                T.reads()   # declared empty: the inferred regions would name the lets below
                T.writes()
                acc = T.sblock_alloc_buffer((D,), "float32")
                s = T.sblock_alloc_buffer((tile,), "float32")
                st = T.sblock_alloc_buffer((4,), "float32")
                t: T.let[T.int32] = th // Hq
                h: T.let[T.int32] = th % Hq
                L: T.let[T.int32] = T.min(pos[0] + t + 1, C)
                online_softmax_row(q, k_cache, v_cache, out, acc, s, st, t, h, L)

    return prefill_attention


def _gpu_func(wl: dict, threads: int, tpt: int, rows: int, key_tile: int):
    n, Hq, Hkv, D, C, dt = _dims(wl)
    G, VEC, BN = Hq // Hkv, _vec(dt), key_tile
    M, NG = n * G, threads // tpt             # query rows per KV head, row groups of a block
    BM = NG * rows                            # query rows of a block
    EPL = D // tpt                            # a row's elements per lane: lane c holds
    NLD = EPL // VEC                          # (j * tpt + c) * VEC + e, 16-byte pieces
    PIECES = BN * D // VEC                    # 16-byte pieces of a K (or V) tile
    SCALE = 1.0 / math.sqrt(D) * math.log2(math.e)      # scores in base 2: exp2 instead of exp

    # Index arithmetic, called from the TIR below with TIR variables.
    def row(bm, k, g):         # the k-th query row of row group g: a (token, head of the group) pair
        return bm * BM + k * NG + g

    def head_col(j, c, e):     # element e of lane c's j-th piece of a head
        return (j * tpt + c) * VEC + e

    def piece_row(x, tid):     # the tile row of the x-th piece a thread stages
        return (x * threads + tid) // (D // VEC)

    def piece_col(x, tid, e):
        return (x * threads + tid) % (D // VEC) * VEC + e

    @T.macro
    def stage(tile, cache, kvh, first, x, tid, end):
        # Rows past `end` are zeros, never garbage: a weight of 0 times a NaN is still NaN.
        if first + piece_row(x, tid) < end:
            for e in T.vectorized(VEC):
                tile[piece_row(x, tid), piece_col(x, tid, e)] = cache[kvh, first + piece_row(x, tid),
                                                                      piece_col(x, tid, e)]
        else:
            for e in T.vectorized(VEC):
                tile[piece_row(x, tid), piece_col(x, tid, e)] = T.Cast(dt, 0)

    @T.prim_func(s_tir=True)
    def prefill_attention_gpu(q: T.Buffer((n, Hq, D), dt), k_cache: T.Buffer((Hkv, C, D), dt),
                              v_cache: T.Buffer((Hkv, C, D), dt), pos: T.Buffer((1,), I32),
                              out: T.Buffer((n, Hq * D), dt)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bm in T.thread_binding(-(-M // BM), thread="blockIdx.x"):
            for kvh in T.thread_binding(Hkv, thread="blockIdx.y"):
                for tid in T.thread_binding(threads, thread="threadIdx.x"):
                    with T.sblock("attn"):
                        T.reads()   # declared empty: the inferred regions would name the lets below
                        T.writes()
                        qr = T.sblock_alloc_buffer((rows, EPL), "float32", scope="local")
                        acc = T.sblock_alloc_buffer((rows, EPL), "float32", scope="local")
                        s = T.sblock_alloc_buffer((rows, BN), "float32", scope="local")
                        ml = T.sblock_alloc_buffer((rows, 4), "float32", scope="local")  # max, sum, new max, rescale
                        kv = T.sblock_alloc_buffer((EPL,), dt, scope="local")   # a q, K, V or out slice
                        ks = T.sblock_alloc_buffer((BN, D), dt, scope="shared")
                        vs = T.sblock_alloc_buffer((BN, D), dt, scope="shared")
                        g: T.let[T.int32] = tid // tpt
                        c: T.let[T.int32] = tid % tpt
                        lane: T.let[T.int32] = tid % 32
                        # Keys the block needs: those of its last valid row (the latest token).
                        Lb: T.let[T.int32] = T.min(pos[0] + T.min(M - 1, bm * BM + BM - 1) // G + 1, C)
                        for k in T.unroll(rows):
                            r: T.let[T.int32] = row(bm, k, g)   # token r // G, query head kvh * G + r % G
                            for j in T.unroll(NLD):
                                if r < M:
                                    for e in T.vectorized(VEC):
                                        kv[j * VEC + e] = q[r // G, kvh * G + r % G, head_col(j, c, e)]
                                else:
                                    for e in T.vectorized(VEC):
                                        kv[j * VEC + e] = T.Cast(dt, 0)
                            for i in T.unroll(EPL):
                                qr[k, i] = T.Cast("float32", kv[i]) * T.float32(SCALE)
                                acc[k, i] = T.float32(0)
                            ml[k, 0] = T.float32(NEG)
                            ml[k, 1] = T.float32(0)
                        for it in T.serial(T.ceildiv(Lb, BN)):
                            # 1. Stage this tile's K and V rows, 16-byte pieces, consecutive threads
                            # on consecutive pieces.
                            for x in T.unroll(-(-PIECES // threads)):
                                if x * threads + tid < PIECES:
                                    stage(ks, k_cache, kvh, it * BN, x, tid, Lb)
                                    stage(vs, v_cache, kvh, it * BN, x, tid, Lb)
                            T.tvm_storage_sync("shared")
                            # 2. Scores: each K row read from shared memory once for all `rows` rows,
                            # partial dot products summed over the row's tpt lanes (every lane runs
                            # the shuffles, rows past M included).
                            for j in T.unroll(BN):
                                for jj in T.unroll(NLD):
                                    for e in T.vectorized(VEC):
                                        kv[jj * VEC + e] = ks[j, head_col(jj, c, e)]
                                for k in T.unroll(rows):
                                    s[k, j] = T.float32(0)
                                    for i in T.unroll(EPL):
                                        s[k, j] += qr[k, i] * T.Cast("float32", kv[i])
                                for o in T.unroll(_log2(tpt)):
                                    for k in T.unroll(rows):
                                        s[k, j] += shfl(s[k, j], lane, tpt // 2 >> o)
                            # 3. Per row: causal mask (keys past the token or the capacity), new
                            # running max, weights, running sum, and the factor rescaling what was
                            # accumulated before. The row's lanes hold the same values: no shuffles.
                            for k in T.unroll(rows):
                                ml[k, 2] = ml[k, 0]
                                for j in T.unroll(BN):
                                    if it * BN + j >= T.min(pos[0] + row(bm, k, g) // G + 1, C):
                                        s[k, j] = T.float32(NEG)
                                    ml[k, 2] = T.max(ml[k, 2], s[k, j])
                                ml[k, 3] = T.exp2(ml[k, 0] - ml[k, 2])
                                ml[k, 1] = ml[k, 1] * ml[k, 3]
                                for j in T.unroll(BN):
                                    s[k, j] = T.exp2(s[k, j] - ml[k, 2])
                                    ml[k, 1] += s[k, j]
                                ml[k, 0] = ml[k, 2]
                                for i in T.unroll(EPL):
                                    acc[k, i] = acc[k, i] * ml[k, 3]
                            # 4. The weighted V rows.
                            for j in T.unroll(BN):
                                for jj in T.unroll(NLD):
                                    for e in T.vectorized(VEC):
                                        kv[jj * VEC + e] = vs[j, head_col(jj, c, e)]
                                for k in T.unroll(rows):
                                    for i in T.unroll(EPL):
                                        acc[k, i] += s[k, j] * T.Cast("float32", kv[i])
                            T.tvm_storage_sync("shared")   # all have read the tile before the next overwrites it
                        for k in T.unroll(rows):
                            r: T.let[T.int32] = row(bm, k, g)
                            if r < M:
                                for i in T.unroll(EPL):
                                    kv[i] = T.Cast(dt, acc[k, i] / ml[k, 1])
                                for j in T.unroll(NLD):
                                    for e in T.vectorized(VEC):
                                        out[r // G, (kvh * G + r % G) * D + head_col(j, c, e)] = kv[j * VEC + e]

    return prefill_attention_gpu


@register
class PrefillAttention(Template):
    name = "prefill_attention"
    gpu_knobs = {
        "threads": [64, 128, 256],         # threads of a block
        "tpt": [2, 4, 8, 16],              # lanes sharing one query row (threads per row)
        "rows": [1, 2, 4],                 # query rows per lane group: a block has rows * threads / tpt
        "key_tile": [16, 32, 64],          # keys staged in shared memory per online-softmax step
    }
    cpu_knobs = {
        "tile": [1, 8, 32],                # scores computed per online-softmax rescale
    }
    tolerance = 2e-3
    # As decode_attention: dlight only has its Fallback for this compute (a data-dependent loop in
    # an opaque block); GPU builds without a record use the default knobs.
    dlight_baseline = False

    def output_specs(self, wl):
        n, Hq, _, D, _, dt = _dims(wl)
        return [((n, Hq * D), dt)]

    def compute(self, wl):
        return _cpu_func(wl, 1, parallel=False)

    def check(self, wl, knobs, target):
        if not target_is_gpu(target):
            return None
        n, Hq, Hkv, D, C, dt = _dims(wl)
        threads, tpt, rows, BN = knobs["threads"], knobs["tpt"], knobs["rows"], knobs["key_tile"]
        if Hq % Hkv:
            return "kv_heads must divide q_heads"
        if D % (tpt * _vec(dt)):
            return "tpt * (elements of a 16-byte load) must divide head_dim"
        if threads > int(target.attrs.get("max_threads_per_block", 1024)) or threads % 32:
            return "threads must be a multiple of 32 within the block limit"
        # q and accumulator slices (fp32) and the tile's scores per row: ptxas keeps them in
        # registers only while this stays small (unrolled code, indices known at compile time)
        if rows * (2 * D // tpt + BN) > 128:
            return "too many values per thread for registers"
        smem = 2 * BN * D * np.dtype(dt).itemsize
        if smem > int(target.attrs.get("max_shared_memory_per_block", 49152)):
            return f"{smem} bytes of shared memory"
        return None

    def default_knobs(self, wl, target):
        if not target_is_gpu(target):
            return {"tile": 8}
        n, Hq, Hkv = wl["n"], wl["q_heads"], wl["kv_heads"]

        def blocks(k):   # and, as a tie-break, the fewest rows per block (fewer idle lanes)
            rows = k["threads"] // k["tpt"] * k["rows"]
            return -(-n * (Hq // Hkv) // rows) * Hkv, -rows

        # 8 lanes per row where head_dim allows (16 elements each at 128), 32-key tiles, and the
        # largest block that still gives ~128 blocks (one per SM); short prompts get the most blocks.
        for tpt in (8, 4, 2, 16):
            valid = [k for key_tile in (32, 16, 64) for threads, rows in ((128, 2), (128, 1), (64, 1))
                     for k in [{"threads": threads, "tpt": tpt, "rows": rows, "key_tile": key_tile}]
                     if self.check(wl, k, target) is None]
            if valid:
                return next((k for k in valid if blocks(k)[0] >= 128), max(valid, key=blocks))
        raise ValueError(f"{self.name}: no valid knobs for {wl}")

    def schedule(self, wl, knobs, target):
        if target_is_gpu(target):
            return tvm.IRModule({"main": _gpu_func(wl, **knobs)})
        return tvm.IRModule({"main": _cpu_func(wl, knobs["tile"], parallel=True)})

    def inputs(self, wl, rng):
        # The whole cache is random: reading a row past a token's position changes its result.
        n, Hq, Hkv, D, C, dt = _dims(wl)
        q = rng.standard_normal((n, Hq, D)).astype(dt)
        k = rng.standard_normal((Hkv, C, D)).astype(dt)
        v = rng.standard_normal((Hkv, C, D)).astype(dt)
        return [q, k, v, np.array([wl.get("pos0", 0)], np.int32), np.zeros((n, Hq * D), dt)]

    def reference(self, inputs):
        q, k, v, pos = inputs[:4]
        n, Hq, D = q.shape
        Hkv, C = k.shape[:2]
        G, p0 = Hq // Hkv, int(pos[0])
        L = min(p0 + n, C)                    # rows any token reads
        kk = np.repeat(k[:, :L].astype(np.float64), G, axis=0)   # query head h -> KV head h // G
        vv = np.repeat(v[:, :L].astype(np.float64), G, axis=0)
        s = np.einsum("thd,hld->htl", q.astype(np.float64), kk) / math.sqrt(D)
        # token t reads positions 0 .. p0 + t (all of the cache once that passes the capacity)
        s = np.where(np.arange(L)[None, :] <= p0 + np.arange(n)[:, None], s, -np.inf)
        p = np.exp(s - s.max(axis=2, keepdims=True))
        o = np.einsum("htl,hld->thd", p / p.sum(axis=2, keepdims=True), vv)
        return o.reshape(n, Hq * D).astype(q.dtype)

    def bytes_moved(self, wl):
        n, Hq, Hkv, D, C, dt = _dims(wl)
        L = min(wl.get("pos0", 0) + n, C)
        return np.dtype(dt).itemsize * (2 * Hkv * L * D + 2 * n * Hq * D) + 4
