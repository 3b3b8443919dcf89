"""Decode attention's first kernel on tensor cores (`mma=1` of decode_attention.py), for grouped
query heads: the G <= 8 query heads of a KV head are the 8 real rows of a 16-row MMA operand, so one
K/V row read from memory feeds all of them at tensor-core speed. On CUDA cores each K/V element costs
2*G fp32 FMAs plus shuffles; at G = 8 that, not memory, set the pace (24% of copy at 4096 rows).

One warp per 16 KV rows at a time, no shared memory and no block barrier inside the loop; each warp
keeps its own online softmax, and the warps of a block merge once at the end. Per 16 rows, with
mma.m16n8k16 (f16 in, f32 accumulate; lane = 4 * grp + t):
  scores  S[head, row] = Q[head, :] . K[row, :]     M = heads (8 real, 8 zero), N = 8 rows, 2 tiles
  output  O^T[d, head] += V^T[d, rows] . P^T[rows, head]   M = 16 of head_dim, N = heads, K = 16 rows
The scores' accumulator layout (lane holds head grp, rows 2t and 2t+1) is exactly the P^T operand
layout, so P goes from one MMA to the next in registers. Head-dim positions are permuted so that
every lane loads whole 16-byte vectors: a dot product does not care in which order d is summed (Q
and K use the same permutation), and the output's permutation is undone when it is written.

`cluster=1` (sm_90): the partitions of a KV head are one thread block cluster, which merges them
itself, so there is no second kernel and no round trip of the partials through global memory. Block
p owns slice p of the G*D outputs: every block puts its (max, sum) per head and its share of each
slice into the owner's shared memory (DSMEM), one cluster barrier publishes them, and each block
merges and writes its slice."""
from __future__ import annotations

import math

from tvm.script import tirx as T

from .allreduce_add_norm import ST_CLUSTER_CUDA
from .cuda_helpers import register_cuda_helper

# One warp's d += a.b, fragments as in the PTX ISA's mma.m16n8k16 (.row.col, f16 -> f32): a0,a1 row
# grp cols 2t,2t+1; a2,a3 row grp+8; a4..a7 the same rows, cols +8. b0,b1 rows 2t,2t+1 of col grp;
# b2,b3 rows +8. d0,d1 row grp cols 2t,2t+1; d2,d3 row grp+8. The CPU emulator of the tests defines
# SHARDTUNE_EMULATED_MMA and its own version.
ST_MMA_CUDA = r"""
#ifndef SHARDTUNE_EMULATED_MMA
__device__ __forceinline__ unsigned st_pack_h2(half lo, half hi) {
  __half2 v = __halves2half2(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ int st_mma_16816(float* d, half a0, half a1, half a2, half a3, half a4, half a5,
                                            half a6, half a7, half b0, half b1, half b2, half b3) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(st_pack_h2(a0, a1)), "r"(st_pack_h2(a2, a3)), "r"(st_pack_h2(a4, a5)), "r"(st_pack_h2(a6, a7)),
                 "r"(st_pack_h2(b0, b1)), "r"(st_pack_h2(b2, b3)));
  return 0;
}
#endif
"""
register_cuda_helper("st_mma_16816", ST_MMA_CUDA)
# cluster=1 calls the all-reduce's cluster helpers (registered there first, which keeps their place
# in generated code, and so the all-reduce records' source hashes, as they were).
for _name in ("st_cluster_put", "st_cluster_arrive", "st_cluster_wait", "st_cluster_sync"):
    register_cuda_helper(_name, ST_CLUSTER_CUDA)
FULL = 0xFFFFFFFF
NEG = -1e30


def registers(D: int, unroll: int) -> int:
    """About how many 32-bit registers a thread needs: K and V of `unroll` tiles, the output
    accumulators, Q, and some for scores and addresses."""
    return unroll * D // 2 + D // 4 + D // 8 + 24


def shared_bytes(G: int, D: int, warps: int, cluster_parts: int = 0) -> int:
    """The warps' partials, and with a cluster of `cluster_parts` blocks the slots the others fill."""
    return 4 * warps * G * (D + 2) + (4 * G * (D + 2 * cluster_parts) if cluster_parts else 0)


def partial_kernel(wl: dict, parts: int, threads: int, unroll: int, part_size, cluster: bool = False):
    """The T.macro of kernel 1: blocks (partition, KV head) write part_acc/part_ml as the CUDA-core
    kernel does; `part_size(L)` gives the rows of a partition (a multiple of `step(...)`). With
    `cluster`, the KV head's blocks merge the partitions themselves and write `out` instead."""
    Hq, Hkv, D, C, dt = wl["q_heads"], wl["kv_heads"], wl["head_dim"], wl["capacity"], wl["dtype"]
    G, NW, U = Hq // Hkv, threads // 32, unroll
    SL = G * D // parts                               # outputs a block of a cluster merges
    STEP, NC, NJ = 16 * NW * U, D // 16, D // 32      # rows a block takes per iteration; d chunks
    DT = D // 8                                       # d positions a lane holds of each V row
    VV = min(8, DT)                                   # halves per V load
    SCALE = 1.0 / math.sqrt(D) * math.log2(math.e)

    def shfl(val, src):
        return T.tvm_warp_shuffle(T.uint32(FULL), val, src, 32, 32)

    def mma(acc, i, a, b):   # acc[i, 0:4] += a . b
        T.evaluate(T.call_extern("int32", "st_mma_16816", T.address_of(acc[i, 0]), *a, *b))

    def put(slot, rank, value):   # `value` into `slot` of block `rank` of the cluster
        T.evaluate(T.call_extern("int32", "st_cluster_put", T.address_of(slot), rank, value))

    @T.macro
    def block_state(st, wml, g):   # st[2], st[3]: the block's (max, sum) of head g, over its warps
        st[2] = T.float32(NEG)
        for k in T.unroll(NW):
            st[2] = T.max(st[2], wml[k, g, 0])
        st[3] = T.float32(0)
        for k in T.unroll(NW):
            st[3] = st[3] + wml[k, g, 1] * T.exp2(wml[k, g, 0] - st[2])

    @T.macro
    def warps_sum(st, wsum, e):   # st[2]: output e (head e // D, position e % D) summed over the warps
        st[2] = T.float32(0)
        for k in T.unroll(NW):
            st[2] = st[2] + wsum[k, e // D, e % D]

    @T.macro
    def block(q, k_cache, v_cache, pos, out, part_acc, part_ml, bp, bh, tid):
        with T.sblock("partial_mma"):
            T.reads()
            T.writes()
            qa = T.sblock_alloc_buffer((NJ, 8), dt, scope="local")
            kr = T.sblock_alloc_buffer((U, 2, NJ * 8), dt, scope="local")
            vr = T.sblock_alloc_buffer((U, 4, DT), dt, scope="local")
            sc = T.sblock_alloc_buffer((2, 4), "float32", scope="local")
            acc = T.sblock_alloc_buffer((NC, 4), "float32", scope="local")
            st = T.sblock_alloc_buffer((6,), "float32", scope="local")  # m, l, new m, factor, f0, f1
            wml = T.sblock_alloc_buffer((NW, G, 2), "float32", scope="shared")
            wsum = T.sblock_alloc_buffer((NW, G, D), "float32", scope="shared")
            if cluster:
                # Filled by the other blocks while this one still runs: zeroed first, so
                # that TVM's storage planning (which sees one thread) gives them memory
                # of their own; the arrive (release) orders that before any block's puts.
                cl_acc = T.sblock_alloc_buffer((parts, SL), "float32", scope="shared")
                cl_ml = T.sblock_alloc_buffer((parts, G, 2), "float32", scope="shared")
                for x in T.unroll(-(-G * D // threads)):
                    if x * threads + tid < G * D:
                        cl_acc[(x * threads + tid) // SL, (x * threads + tid) % SL] = T.float32(0)
                for x in T.unroll(-(-2 * G * parts // threads)):
                    if x * threads + tid < 2 * G * parts:
                        cl_ml[(x * threads + tid) // (2 * G), (x * threads + tid) // 2 % G,
                              (x * threads + tid) % 2] = T.float32(0)
                T.evaluate(T.call_extern("int32", "st_cluster_arrive"))
            L: T.let[T.int32] = T.min(pos[0] + 1, C)
            start: T.let[T.int32] = bp * part_size(L)
            end: T.let[T.int32] = start + T.max(0, T.min(part_size(L), L - start))
            lane: T.let[T.int32] = tid % 32
            w: T.let[T.int32] = tid // 32
            grp: T.let[T.int32] = lane // 4
            t: T.let[T.int32] = lane % 4
            for j in T.unroll(NJ):   # head grp's d = 32j + 8t + e (zeros past the G heads)
                if grp < G:
                    for e in T.vectorized(8):
                        qa[j, e] = q[0, bh * G + grp, 32 * j + 8 * t + e]
                else:
                    for e in T.vectorized(8):
                        qa[j, e] = T.Cast(dt, 0)
            for c in T.unroll(NC):
                for i in T.unroll(4):
                    acc[c, i] = T.float32(0)
            st[0] = T.float32(NEG)
            st[1] = T.float32(0)
            for it in T.serial(T.ceildiv(end - start, STEP)):
                # All loads of the iteration first. Rows past the end are zeros (the
                # cache there may hold anything, and 0 * NaN is NaN in an MMA too).
                for u in T.unroll(U):
                    for nt in T.unroll(2):   # K rows base + 8 nt + grp, d = 32j + 8t + e
                        for j in T.unroll(NJ):
                            if start + it * STEP + (u * NW + w) * 16 + nt * 8 + grp < end:
                                for e in T.vectorized(8):
                                    kr[u, nt, j * 8 + e] = k_cache[bh, start + it * STEP + (u * NW + w) * 16
                                                                   + nt * 8 + grp, 32 * j + 8 * t + e]
                            else:
                                for e in T.vectorized(8):
                                    kr[u, nt, j * 8 + e] = T.Cast(dt, 0)
                    for r in T.unroll(4):    # V rows 2t, 2t+1, 2t+8, 2t+9; d = grp * DT + x
                        for j in T.unroll(DT // VV):
                            if start + it * STEP + (u * NW + w) * 16 + 2 * t + r % 2 + 8 * (r // 2) < end:
                                for e in T.vectorized(VV):
                                    vr[u, r, j * VV + e] = v_cache[bh, start + it * STEP + (u * NW + w) * 16
                                                                   + 2 * t + r % 2 + 8 * (r // 2), grp * DT + j * VV + e]
                            else:
                                for e in T.vectorized(VV):
                                    vr[u, r, j * VV + e] = T.Cast(dt, 0)
                for u in T.unroll(U):
                    if start + it * STEP + (u * NW + w) * 16 < end:   # the same for the whole warp
                        for nt in T.unroll(2):
                            for i in T.unroll(4):
                                sc[nt, i] = T.float32(0)
                        for c in T.unroll(NC):   # chunk c: the half c % 2 of pair c // 2
                            for nt in T.unroll(2):
                                mma(sc, nt,
                                    [qa[c // 2, c % 2 * 4], qa[c // 2, c % 2 * 4 + 1], T.float16(0), T.float16(0),
                                     qa[c // 2, c % 2 * 4 + 2], qa[c // 2, c % 2 * 4 + 3], T.float16(0), T.float16(0)],
                                    [kr[u, nt, c // 2 * 8 + c % 2 * 4], kr[u, nt, c // 2 * 8 + c % 2 * 4 + 1],
                                     kr[u, nt, c // 2 * 8 + c % 2 * 4 + 2], kr[u, nt, c // 2 * 8 + c % 2 * 4 + 3]])
                        # Online softmax of head grp over its rows 8 nt + 2t + i (i < 2).
                        st[2] = st[0]
                        for nt in T.unroll(2):
                            for i in T.unroll(2):
                                if start + it * STEP + (u * NW + w) * 16 + nt * 8 + 2 * t + i < end:
                                    sc[nt, i] = sc[nt, i] * T.float32(SCALE)
                                    st[2] = T.max(st[2], sc[nt, i])
                        st[2] = T.max(st[2], shfl(st[2], T.bitwise_xor(lane, 1)))
                        st[2] = T.max(st[2], shfl(st[2], T.bitwise_xor(lane, 2)))
                        st[3] = T.exp2(st[0] - st[2])
                        st[0] = st[2]
                        st[1] = st[1] * st[3]
                        for nt in T.unroll(2):
                            for i in T.unroll(2):
                                if start + it * STEP + (u * NW + w) * 16 + nt * 8 + 2 * t + i < end:
                                    sc[nt, i] = T.exp2(sc[nt, i] - st[2])
                                    st[1] = st[1] + sc[nt, i]
                                else:
                                    sc[nt, i] = T.float32(0)
                        # This lane accumulates heads 2t and 2t+1: their factors.
                        st[4] = shfl(st[3], 8 * t)
                        st[5] = shfl(st[3], 8 * t + 4)
                        for c in T.unroll(NC):
                            for i in T.unroll(4):
                                acc[c, i] = acc[c, i] * st[4 + i % 2]
                            mma(acc, c,
                                [vr[u, 0, 2 * c], vr[u, 1, 2 * c], vr[u, 0, 2 * c + 1], vr[u, 1, 2 * c + 1],
                                 vr[u, 2, 2 * c], vr[u, 3, 2 * c], vr[u, 2, 2 * c + 1], vr[u, 3, 2 * c + 1]],
                                [T.Cast(dt, sc[0, 0]), T.Cast(dt, sc[0, 1]), T.Cast(dt, sc[1, 0]),
                                 T.Cast(dt, sc[1, 1])])
            # Merge the warps: the block's max per head, each warp's share rescaled to it.
            st[1] = st[1] + shfl(st[1], T.bitwise_xor(lane, 1))
            st[1] = st[1] + shfl(st[1], T.bitwise_xor(lane, 2))
            if t == 0 and grp < G:
                wml[w, grp, 0] = st[0]
                wml[w, grp, 1] = st[1]
            T.tvm_storage_sync("shared")
            for hh in T.unroll(2):   # acc[c, hh] and acc[c, 2 + hh]: head 2t + hh, d of c
                if 2 * t + hh < G:
                    st[2] = T.float32(NEG)
                    for k in T.unroll(NW):
                        st[2] = T.max(st[2], wml[k, 2 * t + hh, 0])
                    st[3] = T.exp2(wml[w, 2 * t + hh, 0] - st[2])
                    for c in T.unroll(NC):
                        wsum[w, 2 * t + hh, grp * DT + 2 * c] = acc[c, hh] * st[3]
                        wsum[w, 2 * t + hh, grp * DT + 2 * c + 1] = acc[c, 2 + hh] * st[3]
            T.tvm_storage_sync("shared")
            if cluster:
                T.evaluate(T.call_extern("int32", "st_cluster_wait"))   # every block started
                for x in T.unroll(-(-G * D // threads)):   # output e to the owner of its slice
                    if x * threads + tid < G * D:
                        warps_sum(st, wsum, x * threads + tid)
                        put(cl_acc[bp, (x * threads + tid) % SL], (x * threads + tid) // SL, st[2])
                for x in T.unroll(-(-G * parts // threads)):   # head e % G's (max, sum) to block e // G
                    if x * threads + tid < G * parts:
                        block_state(st, wml, (x * threads + tid) % G)
                        put(cl_ml[bp, (x * threads + tid) % G, 0], (x * threads + tid) // G, st[2])
                        put(cl_ml[bp, (x * threads + tid) % G, 1], (x * threads + tid) // G, st[3])
                T.evaluate(T.call_extern("int32", "st_cluster_sync"))
                for x in T.unroll(-(-SL // threads)):   # merge this block's slice
                    if x * threads + tid < SL:
                        st[2] = T.float32(NEG)
                        for k in T.unroll(parts):
                            st[2] = T.max(st[2], cl_ml[k, (bp * SL + x * threads + tid) // D, 0])
                        st[3] = T.float32(0)
                        st[4] = T.float32(0)
                        for k in T.unroll(parts):
                            st[5] = T.exp2(cl_ml[k, (bp * SL + x * threads + tid) // D, 0] - st[2])
                            st[3] = st[3] + cl_ml[k, (bp * SL + x * threads + tid) // D, 1] * st[5]
                            st[4] = st[4] + cl_acc[k, x * threads + tid] * st[5]
                        out[0, bh * G * D + bp * SL + x * threads + tid] = T.Cast(dt, st[4] / st[3])
            else:
                for x in T.unroll(-(-G * D // threads)):
                    if x * threads + tid < G * D:
                        warps_sum(st, wsum, x * threads + tid)
                        part_acc[bh * G + (x * threads + tid) // D, bp, (x * threads + tid) % D] = st[2]
                if tid < G:
                    block_state(st, wml, tid)
                    part_ml[bh * G + tid, bp, 0] = st[2]
                    part_ml[bh * G + tid, bp, 1] = st[3]

    @T.macro
    def kernel(q, k_cache, v_cache, pos, out, part_acc, part_ml):
        for bp in T.thread_binding(parts, thread="blockIdx.x"):
            for bh in T.thread_binding(Hkv, thread="blockIdx.y"):
                if cluster:
                    for _ in T.thread_binding(parts, thread="clusterCtaIdx.x"):
                        for tid in T.thread_binding(threads, thread="threadIdx.x"):
                            block(q, k_cache, v_cache, pos, out, part_acc, part_ml, bp, bh, tid)
                else:
                    for tid in T.thread_binding(threads, thread="threadIdx.x"):
                        block(q, k_cache, v_cache, pos, out, part_acc, part_ml, bp, bh, tid)

    return kernel
