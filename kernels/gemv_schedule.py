"""The GEMV schedules the GEMV templates share, as functions of their knobs.

The block "gemv" has loops (b, i, [j,] k): batch row, output row, an optional inner
pair axis (gate/up rows that one thread owns both of) and the reduction. The block
"epilogue" reads the reduced rows of a thread block and writes the output."""
from __future__ import annotations

import itertools

#: Knobs of the CPU schedule, the same for every GEMV template, and their default.
CPU_DEFAULT = {"rows": 4, "lanes": 16, "unroll": 1}
CPU_KNOBS = {
    "rows": [1, 4, 16, 64],            # output rows per parallel task
    "lanes": [8, 16, 32],              # partial sums kept in SIMD registers
    "unroll": [1, 2, 4],               # K steps of `lanes` unrolled
}


#: Whether the K loop of a thread is a loop or unrolled, so that every step's loads can be issued
#: before the first step's math: a block then waits for memory once, not once per step. A pure read
#: of 19 MB reaches 87% of copy on an H100, our GEMVs of that size 70%
#: (benchmarks/results/2026-11-27-read-speed-of-light/). Unrolled won by 2-7% where rows of 4096-8192
#: outputs take 4-8 steps (the 7B down and o GEMVs, several gate/up), lost by up to 11% elsewhere
#: (2026-11-27-gemv-k-loop/). First value: the schedule as it was, so old records keep (`db refresh`).
K_LOOPS = ["serial", "unrolled"]
MAX_UNROLLED_STEPS = 8   # code size and registers


def default_gpu_knobs(tpl, wl: dict, target, vecs: tuple, txs: tuple, **fixed) -> dict:
    """The widest loads and rows the shape allows: a sensible untuned choice."""
    for vec, tx, rows in itertools.product(vecs, txs, (4, 8, 16, 2, 1)):
        knobs = {"rows": rows, "tx": tx, "vec": vec, "unroll": 1, "x_scope": "global", "k_loop": "serial", **fixed}
        if tpl.check(wl, knobs, target) is None:
            return knobs
    raise ValueError(f"{tpl.name}: no valid knobs for {wl}")


def check_gpu(knobs: dict, out_rows: int, row_loads: int, batch: int, K: int, load_unit: str) -> str | None:
    """Why the GPU schedule cannot take these knobs, or None. `row_loads`: elements a row is
    loaded in (`load_unit` names them: packed words, fp16 values)."""
    threads = knobs["rows"] * knobs["tx"]
    if not 32 <= threads <= 1024:
        return f"{threads} threads per block"
    if out_rows % knobs["rows"]:
        return "rows must divide the output rows"
    if row_loads % knobs["vec"]:
        return f"vec must divide {load_unit}"
    # A step that does not divide the row leaves a last, partial step: TVM guards it with a
    # predicate (K = 11008 is 1376 = 32 * 43 words, which few whole steps divide).
    step = knobs["tx"] * knobs["vec"] * knobs["unroll"]
    if row_loads <= step:
        # One step per row makes TVM's buffer compaction keep a whole row of x per thread.
        return f"tx * vec * unroll must fit {load_unit} at least twice"
    if knobs["x_scope"] == "shared" and batch * K * 2 > 48 * 1024:
        return "activation does not fit 48 KB of shared memory"
    if knobs["k_loop"] == "unrolled" and -(-row_loads // step) > MAX_UNROLLED_STEPS:
        return f"more than {MAX_UNROLLED_STEPS} steps of K to unroll"
    return None


def check_cpu(knobs: dict, out_rows: int, K: int) -> str | None:
    if out_rows % knobs["rows"] or K % (knobs["lanes"] * knobs["unroll"]):
        return "rows must divide the output rows and lanes * unroll must divide K"
    return None


def schedule_gemv_gpu(sch, weight: str, rows: int, tx: int, vec: int, unroll: int, x_scope: str,
                      per_step: int, k_loop: str = "serial") -> None:
    """Threads (tx) along K, `rows` output rows per block; `vec` weight elements of the
    buffer `weight` per load; `per_step` reduction steps per loaded element; `k_loop` (K_LOOPS)."""
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
    if k_loop == "unrolled":
        sch.unroll(ko)
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
