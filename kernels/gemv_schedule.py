"""The GEMV schedules the GEMV templates share, as functions of their knobs.

The block "gemv" has loops (b, i, [j,] k): batch row, output row, an optional inner
pair axis (gate/up rows that one thread owns both of) and the reduction. The block
"epilogue" reads the reduced rows of a thread block and writes the output."""
from __future__ import annotations


def schedule_gemv_gpu(sch, weight: str, rows: int, tx: int, vec: int, unroll: int, x_scope: str,
                      per_step: int) -> None:
    """Threads (tx) along K, `rows` output rows per block; `vec` weight elements of the
    buffer `weight` per load; `per_step` reduction steps per loaded element."""
    gemv = sch.get_sblock("gemv")
    b, i, *pair, k = sch.get_loops(gemv)
    bx, ty = sch.split(i, [None, rows])
    # A warp's threads read neighbouring vec-element chunks of a row: coalesced loads.
    ko, ku, tx_, ke = sch.split(k, [None, unroll, tx, vec * per_step])
    # The pair outside the loads (its two rows are far apart: one cached region each would span
    # the rows between), b innermost: each decoded weight serves every batch row.
    sch.reorder(bx, ty, tx_, ko, *pair, ku, ke, b)
    rf = sch.rfactor(tx_, factor_axis=0)     # per-thread partial sums
    bx, ty, tx_, ko, *rest = sch.get_loops(rf)
    pair, (ku, ke, *inner) = rest[:len(pair)], rest[len(pair):]
    inner = [*pair, *inner]
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx_, "threadIdx.x")
    for loop in (ku, ke, *inner):
        # Unrolled: partial sums indexed by constants stay in registers, not local memory.
        sch.unroll(loop)
    sch.set_scope(rf, 0, "local")

    names = [r.source.name for r in sch.get(rf).reads]
    wl = sch.cache_read(rf, names.index(weight), "local")   # vec elements per load, into registers
    sch.compute_at(wl, ku)
    if vec > 1:  # at vec=1 the copy has no loop of its own to vectorize
        sch.vectorize(sch.get_loops(wl)[-1])
    if x_scope == "shared":
        xs = sch.cache_read(rf, names.index("x"), "shared")
        sch.compute_at(xs, bx)
        fused = sch.fuse(*sch.get_loops(xs)[1:])
        _, lty, ltx, lv = sch.split(fused, [None, rows, tx, 8])
        sch.bind(lty, "threadIdx.y")
        sch.bind(ltx, "threadIdx.x")
        sch.vectorize(lv)
    xl = sch.cache_read(rf, names.index("x"), "local")     # this step's activations, 16-byte loads
    sch.compute_at(xl, ku)
    x_elems = sch.get(sch.get_loops(xl)[-1]).extent
    sch.vectorize(sch.split(sch.get_loops(xl)[-1], [None, min(8, int(x_elems))])[1])

    sch.reverse_compute_at(gemv, ty)          # cross-thread sum over tx (warp shuffles)
    tx_r, *rest = sch.get_loops(gemv)[2:]     # the reduction over tx, then batch/pair loops
    assert int(sch.get(tx_r).extent) == tx, "expected the cross-thread reduction loop first"
    if rest:
        sch.reorder(*rest, tx_r)
    sch.bind(tx_r, "threadIdx.x")
    sch.set_scope(gemv, 0, "local")
    sch.reverse_compute_at(sch.get_sblock("epilogue"), ty)
    sch.decompose_reduction(rf, ko)


def schedule_gemv_cpu(sch, rows: int, lanes: int, unroll: int) -> None:
    gemv = sch.get_sblock("gemv")
    b, i, *pair, k = sch.get_loops(gemv)
    no, ni = sch.split(i, [None, rows])
    ko, ku, kv = sch.split(k, [None, unroll, lanes])
    sch.reorder(no, ni, *pair, b, ko, ku, kv)
    # `lanes` independent partial sums: a SIMD vector instead of one dependent FMA chain.
    rf = sch.rfactor(kv, factor_axis=0)
    no, ni, *_, ko, ku, kv = sch.get_loops(rf)
    sch.parallel(no)
    sch.unroll(ku)
    sch.vectorize(kv)
    sch.decompose_reduction(rf, ko)
    sch.reverse_compute_at(gemv, ni)
    sch.reverse_compute_at(sch.get_sblock("epilogue"), ni)
