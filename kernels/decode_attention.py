"""Decode attention (batch 1, one new query token) over one shard's KV cache, with
grouped-query attention: query head h reads KV head h // (Hq / Hkv).

KV cache layout: per layer one contiguous k_cache and v_cache, each [kv_heads, capacity, head_dim]
(capacity fixed at build time). At batch 1 there is one sequence, so a page table would be pure
indirection: contiguous rows give the simplest address math and the longest unbroken loads
(a paged cache is for serving many sequences). The current position is a device-side int32
buffer `pos` [1], read by the kernel: every shape of the decode step stays static, so the whole
step can be captured in a CUDA graph. The kernel attends over positions 0..pos[0] (length pos[0]+1)
and reads only those rows: its cost grows with the length, not the capacity.

Arguments: q [1, Hq, D], k_cache, v_cache, pos, then outputs out [1, Hq*D] and the scratch
part_acc [Hq, P, D], part_ml [Hq, P, 2] (fp32, P = scratch_parts(wl), independent of the knobs so
every schedule has the same signature). Scratch is an output rather than an allocation inside the
kernel because Relax plans outputs statically, which keeps CUDA graph capture safe.

GPU: flash-decoding, written directly as TIR with explicit thread bindings (the loops over the
length are data-dependent, which schedule primitives handle poorly). Kernel 1 splits the length
into at most `parts` partitions per KV head, one thread block each; a block serves the query
heads of its KV head (all of them when kv_split=1, so each K/V element is read once), walks its
rows in steps (K and V rows of a step loaded together, 16-byte loads), keeps an online softmax,
and writes per query head a partial (max, sum, unnormalised acc). Kernel 2 merges the partials
of each query head. Scores, softmax and accumulation in fp32; base-2 exponentials.
CPU: one query head per parallel iteration, online softmax over tiles of scores."""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm.script import tirx as T

from . import register
from . import attention_mma
from .template import Template, target_is_gpu

MAX_PARTS = 128
NEG = -1e30          # finite "minus infinity": exp2(NEG - NEG) stays 0 * ..., never NaN
FULL = 0xFFFFFFFF
COMBINE_WARPS = 8
I32, F32 = "int32", "float32"   # names, not strings, in annotations (pyflakes reads strings as names)


def scratch_parts(wl: dict) -> int:
    return min(MAX_PARTS, wl["capacity"])


def _dims(wl):
    return wl["q_heads"], wl["kv_heads"], wl["head_dim"], wl["capacity"], wl["dtype"]


def online_softmax_row_macro(D: int, G: int, tile: int, dt: str):
    """Attention of one query row on the CPU (shared with prefill_attention): query head h of token
    row t over cache rows 0..L-1 of KV head h // G, an online softmax over tiles of `tile` scores,
    into out[t, h*D : (h+1)*D]. acc [D], s [tile], st [4] (max, sum, tile max, rescale): scratch."""
    scale = 1.0 / math.sqrt(D)

    @T.macro
    def online_softmax_row(q, k_cache, v_cache, out, acc, s, st, t, h, L):
        st[0] = T.float32(NEG)
        st[1] = T.float32(0)
        for d in T.serial(D):
            acc[d] = T.float32(0)
        for it in T.serial(T.ceildiv(L, tile)):
            st[2] = st[0]
            for j in T.serial(tile):
                s[j] = T.float32(NEG)
                if it * tile + j < L:
                    s[j] = T.float32(0)
                    for d in T.serial(D):
                        s[j] += (T.Cast("float32", q[t, h, d])
                                 * T.Cast("float32", k_cache[h // G, it * tile + j, d]))
                    s[j] = s[j] * T.float32(scale)
                    st[2] = T.max(st[2], s[j])
            st[3] = T.exp(st[0] - st[2])
            st[1] = st[1] * st[3]
            for d in T.serial(D):
                acc[d] = acc[d] * st[3]
            for j in T.serial(tile):
                if it * tile + j < L:
                    s[j] = T.exp(s[j] - st[2])
                    st[1] += s[j]
                    for d in T.serial(D):
                        acc[d] += s[j] * T.Cast("float32", v_cache[h // G, it * tile + j, d])
            st[0] = st[2]
        for d in T.serial(D):
            out[t, h * D + d] = T.Cast(dt, acc[d] / st[1])

    return online_softmax_row


def _cpu_func(wl: dict, tile: int, parallel: bool):
    """One query head per (parallel) iteration, online softmax over tiles of `tile` scores."""
    Hq, Hkv, D, C, dt = _dims(wl)
    P = scratch_parts(wl)
    loop = T.parallel if parallel else T.serial
    online_softmax_row = online_softmax_row_macro(D, Hq // Hkv, tile, dt)

    @T.prim_func(s_tir=True)
    def decode_attention(q: T.Buffer((1, Hq, D), dt), k_cache: T.Buffer((Hkv, C, D), dt),
                         v_cache: T.Buffer((Hkv, C, D), dt), pos: T.Buffer((1,), I32),
                         out: T.Buffer((1, Hq * D), dt), part_acc: T.Buffer((Hq, P, D), F32),
                         part_ml: T.Buffer((Hq, P, 2), F32)):
        T.func_attr({"tirx.noalias": True})
        for h in loop(Hq):
            with T.sblock("attn"):
                T.reads()   # declared empty: the inferred regions would name the let L
                T.writes()
                acc = T.sblock_alloc_buffer((D,), "float32")
                s = T.sblock_alloc_buffer((tile,), "float32")
                st = T.sblock_alloc_buffer((4,), "float32")
                L: T.let[T.int32] = T.min(pos[0] + 1, C)
                online_softmax_row(q, k_cache, v_cache, out, acc, s, st, 0, h, L)

    return decode_attention


def _log2(n: int) -> int:
    return n.bit_length() - 1


def shfl(val, lane, off):
    """`val` of lane `lane ^ off`: a butterfly step within 32 lanes (an index shuffle, which the
    ROCm backend supports too; it has no xor shuffle)."""
    return T.tvm_warp_shuffle(T.uint32(FULL), val, T.bitwise_xor(lane, off), 32, 32)


@T.macro
def warp_max(x, i, lane):   # x[i] of every lane becomes the warp's maximum
    for o in T.unroll(5):
        x[i] = T.max(x[i], shfl(x[i], lane, 16 >> o))


@T.macro
def warp_sum(x, i, lane):
    for o in T.unroll(5):
        x[i] = x[i] + shfl(x[i], lane, 16 >> o)


def partition_rows(parts: int, step: int):
    """Rows per partition at run time for length L: step-aligned, at most `parts` partitions."""
    return lambda L: T.max(step, T.ceildiv(T.ceildiv(L, parts), step) * step)


def _merge_kernel(wl: dict, parts: int, part_size):
    """Kernel 2, the same after either first kernel: merges each query head's partitions."""
    Hq, D, C, dt = wl["q_heads"], wl["head_dim"], wl["capacity"], wl["dtype"]
    CT, CE = 32 * COMBINE_WARPS, D // 32                  # threads, elements per lane
    CV = 4 if CE % 4 == 0 else 2 if CE % 2 == 0 else 1   # fp32 elements per load (<= 16 bytes)

    @T.macro
    def merge(pos, out, part_acc, part_ml):
        # Kernel 2: one block per query head merges its partitions (same partition arithmetic).
        # Loops over partitions are unrolled with guards so their loads go out together.
        for h in T.thread_binding(Hq, thread="blockIdx.x"):
            for tid in T.thread_binding(CT, thread="threadIdx.x"):
                with T.sblock("combine"):
                    T.reads()
                    T.writes()
                    o_acc = T.sblock_alloc_buffer((CE,), "float32", scope="local")
                    st = T.sblock_alloc_buffer((3,), "float32", scope="local")   # max, sum, weight
                    wred = T.sblock_alloc_buffer((COMBINE_WARPS, D), "float32", scope="shared")
                    L: T.let[T.int32] = T.min(pos[0] + 1, C)
                    npart: T.let[T.int32] = T.ceildiv(L, part_size(L))
                    lane: T.let[T.int32] = tid % 32
                    w: T.let[T.int32] = tid // 32
                    st[0] = T.float32(NEG)
                    for k in T.unroll(-(-parts // 32)):
                        if k * 32 + lane < npart:
                            st[0] = T.max(st[0], part_ml[h, k * 32 + lane, 0])
                    warp_max(st, 0, lane)
                    st[1] = T.float32(0)
                    for k in T.unroll(-(-parts // 32)):
                        if k * 32 + lane < npart:
                            st[1] += part_ml[h, k * 32 + lane, 1] * T.exp2(part_ml[h, k * 32 + lane, 0] - st[0])
                    warp_sum(st, 1, lane)
                    for e in T.unroll(CE):
                        o_acc[e] = T.float32(0)
                    for k in T.unroll(-(-parts // COMBINE_WARPS)):
                        if k * COMBINE_WARPS + w < npart:
                            st[2] = T.exp2(part_ml[h, k * COMBINE_WARPS + w, 0] - st[0])
                            for e0 in T.unroll(CE // CV):
                                for e in T.vectorized(CV):
                                    o_acc[e0 * CV + e] += (st[2] * part_acc[h, k * COMBINE_WARPS + w,
                                                                            lane * CE + e0 * CV + e])
                    for e in T.unroll(CE):
                        wred[w, lane * CE + e] = o_acc[e]
                    T.tvm_storage_sync("shared")
                    for dd in T.unroll(-(-D // CT)):
                        if dd * CT + tid < D:
                            st[2] = T.float32(0)
                            for k in T.unroll(COMBINE_WARPS):
                                st[2] += wred[k, dd * CT + tid]
                            out[0, h * D + dd * CT + tid] = T.Cast(dt, st[2] / st[1])

    return merge


def _gpu_mma_func(wl: dict, parts: int, threads: int, unroll: int, cluster: int):
    part_size = partition_rows(parts, mma_step(threads, unroll))
    partial = attention_mma.partial_kernel(wl, parts, threads, unroll, part_size, bool(cluster))
    return _two_kernels(wl, partial, None if cluster else _merge_kernel(wl, parts, part_size))


def _two_kernels(wl: dict, partial, merge):
    """The GPU function: kernel 1 (`partial`, a T.macro) writes each partition's softmax state
    to the scratch, kernel 2 (`merge`) combines the partitions. Without `merge`, kernel 1 writes
    `out` itself (and the scratch stays unused)."""
    Hq, Hkv, D, C, dt = _dims(wl)
    P = scratch_parts(wl)

    @T.prim_func(s_tir=True)
    def decode_attention_gpu(q: T.Buffer((1, Hq, D), dt), k_cache: T.Buffer((Hkv, C, D), dt),
                             v_cache: T.Buffer((Hkv, C, D), dt), pos: T.Buffer((1,), I32),
                             out: T.Buffer((1, Hq * D), dt), part_acc: T.Buffer((Hq, P, D), F32),
                             part_ml: T.Buffer((Hq, P, 2), F32)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        partial(q, k_cache, v_cache, pos, out, part_acc, part_ml)
        if merge is not None:
            merge(pos, out, part_acc, part_ml)

    return decode_attention_gpu


def mma_step(threads: int, unroll: int) -> int:
    return 16 * (threads // 32) * unroll   # 16 rows per warp and tile


def _gpu_func(wl: dict, parts: int, threads: int, tpt: int, vec: int, unroll: int, kv_split: int, mma: int,
              cluster: int):
    if mma:
        return _gpu_mma_func(wl, parts, threads, unroll, cluster)
    Hq, Hkv, D, C, dt = _dims(wl)
    G = Hq // Hkv
    GB, NTOK, NW = G // kv_split, threads // tpt, threads // 32   # query heads, rows at once, warps
    GW = -(-GB // NW)                   # query heads per warp in the softmax step
    NLD = D // (tpt * vec)              # loads per K/V row per thread
    EPL = NLD * vec                     # row elements per thread: lane c holds (j*tpt + c)*vec + e
    STEP = NTOK * unroll                # rows per iteration of a block; partitions are multiples
    SCALE = 1.0 / math.sqrt(D) * math.log2(math.e)        # scores in base 2: exp2 instead of exp

    part_size = partition_rows(parts, STEP)
    merge = _merge_kernel(wl, parts, part_size)

    @T.macro
    def load_rows(regs, cache, kvh, first, end, r, c, zero):
        # This thread's slices of rows first + u*NTOK + r; rows past the partition are not read.
        for u in T.unroll(unroll):
            for j in T.unroll(NLD):
                if first + u * NTOK + r < end:
                    for e in T.vectorized(vec):
                        regs[u, j * vec + e] = cache[kvh, first + u * NTOK + r, (j * tpt + c) * vec + e]
                elif zero:
                    for e in T.vectorized(vec):
                        regs[u, j * vec + e] = T.Cast(dt, 0)

    @T.macro
    def partial(q, k_cache, v_cache, pos, out, part_acc, part_ml):
        # Kernel 1: block (partition bp, query-head group bh of KV head bh // kv_split) runs an
        # online softmax over its rows, STEP at a time; K and V rows of a step load together.
        for bp in T.thread_binding(parts, thread="blockIdx.x"):
            for bh in T.thread_binding(Hkv * kv_split, thread="blockIdx.y"):
                for tid in T.thread_binding(threads, thread="threadIdx.x"):
                    with T.sblock("partial"):
                        T.reads()   # declared empty: the inferred regions would name the lets below
                        T.writes()
                        qr = T.sblock_alloc_buffer((GB, EPL), "float32", scope="local")
                        acc = T.sblock_alloc_buffer((GB, EPL), "float32", scope="local")
                        kr = T.sblock_alloc_buffer((unroll, EPL), dt, scope="local")
                        vr = T.sblock_alloc_buffer((unroll, EPL), dt, scope="local")
                        dot = T.sblock_alloc_buffer((unroll, GB), "float32", scope="local")
                        ml = T.sblock_alloc_buffer((GW, 2), "float32", scope="local")  # running max, sum
                        red = T.sblock_alloc_buffer((3,), "float32", scope="local")
                        s = T.sblock_alloc_buffer((GB, STEP), "float32", scope="shared")    # scores
                        pw = T.sblock_alloc_buffer((GB, STEP), "float32", scope="shared")   # weights
                        rescale = T.sblock_alloc_buffer((GB,), "float32", scope="shared")
                        wsum = T.sblock_alloc_buffer((NW, GB * D), "float32", scope="shared")
                        L: T.let[T.int32] = T.min(pos[0] + 1, C)
                        start: T.let[T.int32] = bp * part_size(L)
                        n: T.let[T.int32] = T.max(0, T.min(part_size(L), L - start))   # 0: idle block
                        r: T.let[T.int32] = tid // tpt
                        c: T.let[T.int32] = tid % tpt
                        lane: T.let[T.int32] = tid % 32
                        w: T.let[T.int32] = tid // 32
                        for g in T.unroll(GB):
                            for j in T.unroll(NLD):
                                for e in T.unroll(vec):
                                    qr[g, j * vec + e] = (T.Cast("float32", q[0, bh * GB + g, (j * tpt + c) * vec + e])
                                                          * T.float32(SCALE))
                                    acc[g, j * vec + e] = T.float32(0)
                        for gi in T.unroll(GW):
                            ml[gi, 0] = T.float32(NEG)
                            ml[gi, 1] = T.float32(0)
                        for it in T.serial(T.ceildiv(n, STEP)):
                            load_rows(kr, k_cache, bh // kv_split, start + it * STEP, start + n, r, c, True)
                            load_rows(vr, v_cache, bh // kv_split, start + it * STEP, start + n, r, c, False)
                            # 1. Scores: partial dot products, summed over the tpt lanes of a row.
                            # Every lane runs the shuffles (rows past the partition are zeros).
                            for u in T.unroll(unroll):
                                for g in T.unroll(GB):
                                    dot[u, g] = T.float32(0)
                                    for i in T.unroll(EPL):
                                        dot[u, g] += qr[g, i] * T.Cast("float32", kr[u, i])
                                for o in T.unroll(_log2(tpt)):
                                    for g in T.unroll(GB):
                                        dot[u, g] += shfl(dot[u, g], lane, tpt // 2 >> o)
                                if c == 0:
                                    for g in T.unroll(GB):
                                        s[g, u * NTOK + r] = dot[u, g]
                            T.tvm_storage_sync("shared")
                            # 2. One warp per query head: new running max, weights, running sum,
                            # and the factor rescaling what was accumulated before.
                            for gi in T.unroll(GW):
                                if gi * NW + w < GB:
                                    red[0] = ml[gi, 0]
                                    for k in T.unroll(-(-STEP // 32)):
                                        if k * 32 + lane < STEP and it * STEP + k * 32 + lane < n:
                                            red[0] = T.max(red[0], s[gi * NW + w, k * 32 + lane])
                                    warp_max(red, 0, lane)
                                    red[1] = T.float32(0)
                                    for k in T.unroll(-(-STEP // 32)):
                                        if k * 32 + lane < STEP and it * STEP + k * 32 + lane < n:
                                            red[2] = T.exp2(s[gi * NW + w, k * 32 + lane] - red[0])
                                            pw[gi * NW + w, k * 32 + lane] = red[2]
                                            red[1] += red[2]
                                    warp_sum(red, 1, lane)
                                    red[2] = T.exp2(ml[gi, 0] - red[0])
                                    ml[gi, 1] = ml[gi, 1] * red[2] + red[1]
                                    ml[gi, 0] = red[0]
                                    if lane == 0:
                                        rescale[gi * NW + w] = red[2]
                            T.tvm_storage_sync("shared")
                            # 3. Rescale the accumulators, add this step's weighted V rows.
                            for g in T.unroll(GB):
                                for i in T.unroll(EPL):
                                    acc[g, i] = acc[g, i] * rescale[g]
                                for u in T.unroll(unroll):
                                    if it * STEP + u * NTOK + r < n:
                                        for i in T.unroll(EPL):
                                            acc[g, i] += pw[g, u * NTOK + r] * T.Cast("float32", vr[u, i])
                        for gi in T.unroll(GW):
                            if gi * NW + w < GB and lane == 0:
                                part_ml[bh * GB + gi * NW + w, bp, 0] = ml[gi, 0]
                                part_ml[bh * GB + gi * NW + w, bp, 1] = ml[gi, 1]
                        # 4. Sum the accumulators over the rows of a warp (shuffles), then over
                        # the warps (shared memory).
                        for g in T.unroll(GB):
                            for o in T.unroll(5 - _log2(tpt)):
                                for i in T.unroll(EPL):
                                    acc[g, i] += shfl(acc[g, i], lane, tpt << o)
                        if lane < tpt:
                            for g in T.unroll(GB):
                                for j in T.unroll(NLD):
                                    for e in T.unroll(vec):
                                        wsum[w, g * D + (j * tpt + c) * vec + e] = acc[g, j * vec + e]
                        T.tvm_storage_sync("shared")
                        for x in T.unroll(-(-GB * D // threads)):
                            if x * threads + tid < GB * D:
                                red[0] = T.float32(0)
                                for k in T.unroll(NW):
                                    red[0] += wsum[k, x * threads + tid]
                                part_acc[bh * GB + (x * threads + tid) // D, bp, (x * threads + tid) % D] = red[0]

    return _two_kernels(wl, partial, merge)


def _check_fits(wl: dict, parts: int, step: int, smem: int, target) -> str | None:
    """Partitions of `step` rows that the scratch holds and the capacity fills; shared memory."""
    if parts > scratch_parts(wl) or (parts > 1 and (parts - 1) * step >= wl["capacity"]):
        return "more partitions than the scratch holds or the capacity can fill"
    if smem > int(target.attrs.get("max_shared_memory_per_block", 49152)):
        return f"{smem} bytes of shared memory"
    return None


@register
class DecodeAttention(Template):
    name = "decode_attention"
    gpu_knobs = {
        "parts": [4, 8, 16, 32, 64, 128],  # most partitions of the length per KV head (grid)
        "threads": [64, 128, 256],         # threads of a partition's block
        "tpt": [4, 8, 16, 32],             # threads sharing one K/V row (threads per token)
        "vec": [2, 4, 8],                  # cache elements per load (8 fp16 = 16-byte loads)
        "unroll": [1, 2, 4],               # rows each thread loads before using them (in flight)
        "kv_split": [1, 2, 4, 8],          # blocks sharing a KV head's query heads (1: K/V read once)
        "mma": [0, 1],                     # 1: kernel 1 on tensor cores (attention_mma.py; fp16, sm_80+)
        "cluster": [0, 1],                 # 1: a KV head's partitions merge in one cluster, no kernel 2 (mma, sm_90)
    }
    cpu_knobs = {
        "tile": [1, 8, 32],                # scores computed per online-softmax rescale
    }
    tolerance = 2e-3
    # dlight's rules do not take this compute (a data-dependent loop in an opaque block): without
    # a database record, GPU builds use the default knobs, and tuning has no dlight baseline.
    dlight_baseline = False

    def output_specs(self, wl):
        Hq, D, dt, P = wl["q_heads"], wl["head_dim"], wl["dtype"], scratch_parts(wl)
        return [((1, Hq * D), dt), ((Hq, P, D), "float32"), ((Hq, P, 2), "float32")]   # out, scratch

    def compute(self, wl):
        return _cpu_func(wl, 1, parallel=False)

    def check(self, wl, knobs, target):
        if not target_is_gpu(target):
            return None
        Hq, Hkv, D, C, dt = _dims(wl)
        itemsize = np.dtype(dt).itemsize
        G, tpt, vec, threads = Hq // Hkv, knobs["tpt"], knobs["vec"], knobs["threads"]
        if vec * itemsize > 16:
            return "vec * itemsize must be at most 16 bytes"
        if D % (tpt * vec):
            return "tpt * vec must divide head_dim"
        if D % 32:
            return "the merge kernel needs head_dim a multiple of 32"
        if G % knobs["kv_split"]:
            return "kv_split must divide the query heads per KV head"
        if knobs["mma"]:
            return self._check_mma(wl, knobs, target)
        if knobs["cluster"]:
            return "cluster=1 needs mma=1"
        step = threads // tpt * knobs["unroll"]
        GB, EPL = G // knobs["kv_split"], D // tpt
        # q and the accumulators (fp32), K and V rows, scores: ptxas gave ~200 registers at 192 here
        if 2 * GB * EPL + knobs["unroll"] * (EPL * itemsize // 2 + GB) > 192:
            return "too many values per thread for registers"
        if threads > int(target.attrs.get("max_threads_per_block", 1024)):
            return "too many threads"
        return _check_fits(wl, knobs["parts"], step, 4 * (2 * GB * step + GB + threads // 32 * GB * D), target)

    def _check_mma(self, wl, knobs, target):
        Hq, Hkv, D, C, dt = _dims(wl)
        G, threads, unroll = Hq // Hkv, knobs["threads"], knobs["unroll"]
        arch = str(target.attrs.get("arch", ""))
        if target.kind.name != "cuda" or not arch.startswith("sm_") or int(arch[3:].rstrip("a")) < 80:
            return "mma=1 needs a CUDA target of sm_80 or newer"
        if dt != "float16" or D % 32 or G > 8:
            return "mma=1 needs float16, head_dim a multiple of 32 and at most 8 query heads per KV head"
        if (knobs["tpt"], knobs["vec"], knobs["kv_split"]) != (4, 8, 1):
            return "mma=1 maps threads itself: tpt=4, vec=8, kv_split=1 stand for it"
        if attention_mma.registers(D, unroll) > 200:
            return "too many values per thread for registers"
        if knobs["cluster"]:
            if int(arch[3:].rstrip("a")) < 90:
                return "cluster=1 needs sm_90 or newer (thread block clusters)"
            if knobs["parts"] > 16 or G * D % knobs["parts"]:
                return "cluster=1 needs at most 16 partitions (a cluster's blocks), dividing the heads' outputs"
        return _check_fits(wl, knobs["parts"], mma_step(threads, unroll),
                           attention_mma.shared_bytes(G, D, threads // 32, knobs["parts"] * knobs["cluster"]), target)

    def default_knobs(self, wl, target):
        if not target_is_gpu(target):
            return {"tile": 8}
        Hq, Hkv, D = wl["q_heads"], wl["kv_heads"], wl["head_dim"]
        # ~256 blocks (2 per SM of an H100), 16-byte loads, a few rows in flight per thread.
        want = max(4, 256 // Hkv)
        parts = sorted(self.gpu_knobs["parts"], key=lambda p: (abs(math.log2(p / want)), -p))
        for kv_split in self.gpu_knobs["kv_split"]:
            GB = Hq // Hkv // max(1, kv_split)
            # threads per row: the fewest that keep the per-thread query/accumulator slices small
            tpts = sorted(self.gpu_knobs["tpt"], key=lambda t: (GB * D // t > 64, t))
            for vec in (8, 4, 2):
                for tpt in tpts:
                    for p in parts:
                        for threads, unroll in ((128, 2), (256, 1), (64, 4), (128, 1), (64, 2), (64, 1)):
                            knobs = {"parts": p, "threads": threads, "tpt": tpt, "vec": vec,
                                     "unroll": unroll, "kv_split": kv_split, "mma": 0, "cluster": 0}
                            if self.check(wl, knobs, target) is None:
                                return knobs
        raise ValueError(f"{self.name}: no valid knobs for {wl}")

    def seed_knobs(self, wl, target):
        """Tensor-core settings for the search to measure first: TPE alone would seldom draw
        mma=1 together with the one tpt/vec/kv_split that stand for it."""
        seeds = [{"parts": p, "threads": t, "tpt": 4, "vec": 8, "unroll": u, "kv_split": 1, "mma": 1, "cluster": c}
                 for t, u in ((128, 1), (256, 1), (128, 2)) for p, c in ((16, 0), (32, 0), (64, 0), (8, 1), (16, 1))]
        return [k for k in seeds if target_is_gpu(target) and self.check(wl, k, target) is None]

    def schedule(self, wl, knobs, target):
        if target_is_gpu(target):
            return tvm.IRModule({"main": _gpu_func(wl, **knobs)})
        return tvm.IRModule({"main": _cpu_func(wl, knobs["tile"], parallel=True)})

    def inputs(self, wl, rng):
        # The whole cache is random, so reading rows past pos would change the result.
        Hq, Hkv, D, C, dt = _dims(wl)
        P = scratch_parts(wl)
        q = rng.standard_normal((1, Hq, D)).astype(dt)
        k = rng.standard_normal((Hkv, C, D)).astype(dt)
        v = rng.standard_normal((Hkv, C, D)).astype(dt)
        pos = np.array([wl["length"] - 1], np.int32)
        return [q, k, v, pos, np.zeros((1, Hq * D), dt),
                np.zeros((Hq, P, D), np.float32), np.zeros((Hq, P, 2), np.float32)]

    def reference(self, inputs):
        q, k, v, pos = inputs[:4]
        Hq, Hkv, D = q.shape[1], k.shape[0], q.shape[2]
        L = int(pos[0]) + 1
        kk = np.repeat(k[:, :L].astype(np.float64), Hq // Hkv, axis=0)   # query head h -> KV head h // G
        vv = np.repeat(v[:, :L].astype(np.float64), Hq // Hkv, axis=0)
        s = np.einsum("hd,htd->ht", q[0].astype(np.float64), kk) / math.sqrt(D)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        o = np.einsum("ht,htd->hd", p / p.sum(axis=1, keepdims=True), vv)
        return o.reshape(1, Hq * D).astype(q.dtype)

    def relative_error(self, inputs, run):
        # out is followed by the two scratch outputs: poison all three (a merge that read an
        # unwritten partition would turn NaN), compare out alone.
        return super().relative_error(inputs, lambda n: run(3)[:1])

    def bytes_moved(self, wl):
        itemsize = np.dtype(wl["dtype"]).itemsize
        return itemsize * (2 * wl["kv_heads"] * wl["length"] * wl["head_dim"]
                           + 2 * wl["q_heads"] * wl["head_dim"]) + 4
