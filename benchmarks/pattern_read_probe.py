"""Is it the weights' layout? A pure read (XOR, no math) of each q4f16_1 GEMV record's weights and
scales, in the record's access pattern, against the same read with the weights stored step-major, and
against the fastest flat read of the same bytes. Everything is timed in the same run, the way the tuner
times (back to back in a CUDA graph over rotating copies, cold L2).

The pattern: a block of (tx, rows) threads; thread (x, y) owns output row blockIdx.x * rows + y (and,
for gate/up, row + N/2 too); per K step it loads `unroll` chunks of `vec` words at word
(step * unroll + u) * tx * vec + x * vec, with the scale of each chunk's first word. That is the order of
kernels/gemv_schedule.py.
- row-major: as q4f16_1 stores them, row after row. At any moment the blocks on the GPU read chunks of
  hundreds of rows, each K/2 bytes from the next.
- step-major: word w of row r at ((w / step) * N + r) * step + w % step. A step's chunks of all rows
  are then adjacent, and the GPU sweeps memory as a flat read does.
If step-major reads much faster than row-major, and session 18's `nomath` bound is near row-major,
a weight layout is the lever for issue 3's mid-size shapes. Needs CuPy and torch; reads the records
from the reference database (shardtune, TVM).

    python3 benchmarks/pattern_read_probe.py database/reference/sm_90.jsonl --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys

import numpy as np

import graph_timing   # beside this script
from gemv_bars import rows as bar_rows

KERNELS = r"""
template <int V> struct Words;
template <> struct Words<1> { using T = unsigned; };
template <> struct Words<2> { using T = uint2; };
template <> struct Words<4> { using T = uint4; };
__device__ __forceinline__ unsigned fold(unsigned v) { return v; }
__device__ __forceinline__ unsigned fold(uint2 v) { return v.x ^ v.y; }
__device__ __forceinline__ unsigned fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// W words a row (compile time, so that an unrolled K loop is unrolled), STEPS steps of TX*VEC*UNROLL.
template <int ROWS, int TX, int VEC, int UNROLL, int W, int PAIR, bool STEP_MAJOR, bool UNROLL_K>
__global__ void __launch_bounds__(TX * ROWS) pattern_read(const unsigned* __restrict__ w,
                                                         const unsigned short* __restrict__ s,
                                                         int n, unsigned* sink) {
  constexpr int STEP = TX * VEC * UNROLL, STEPS = (W + STEP - 1) / STEP;
  unsigned acc = 0;
#pragma unroll
  for (int p = 0; p < PAIR; ++p) {
    const long long row = (long long)blockIdx.x * ROWS + threadIdx.y + p * (n / PAIR);
    auto step = [&](int st) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int off = (u * TX + threadIdx.x) * VEC, k = st * STEP + off;
        if (k < W) {
          const long long at = STEP_MAJOR ? ((long long)st * n + row) * STEP + off : row * W + k;
          acc ^= fold(*reinterpret_cast<const typename Words<VEC>::T*>(w + at));
          acc ^= s[STEP_MAJOR ? ((long long)st * n + row) * (STEP / 4) + off / 4 : row * (W / 4) + k / 4];
        }
      }
    };
    if constexpr (UNROLL_K) {   // k_loop=unrolled: every step's loads can be issued at once
#pragma unroll
      for (int st = 0; st < STEPS; ++st) step(st);
    } else {                    // serial: a loop, unrolled or not as nvcc likes, as TVM's code is
      for (int st = 0; st < STEPS; ++st) step(st);
    }
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;   // never, but the compiler cannot drop the loads
}

extern "C" __global__ void flat_read(const uint4* __restrict__ p, long long n16, unsigned* sink) {
  unsigned acc = 0;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += (long long)gridDim.x * blockDim.x) {
    uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}
"""
ROTATE_BYTES = 400e6


def pair_rows(row: dict) -> int:
    """Weight rows a thread reads: gate and up for the SiLU(gate) * up GEMV."""
    return 2 if row["template"].endswith("silu_mul") else 1


def instance(row: dict, step_major: bool) -> str:
    """The kernel template instance that reads `row`'s record in its pattern."""
    k = row["knobs"]
    return (f"pattern_read<{k['rows']}, {k['tx']}, {k['vec']}, {k['unroll']}, {row['K'] // 8}, {pair_rows(row)}, "
            f"{'true' if step_major else 'false'}, {'true' if k.get('k_loop') == 'unrolled' else 'false'}>")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db")
    ap.add_argument("--device", default="H100", help="records measured on this GPU (part of its name)")
    ap.add_argument("--shapes", help="NxK, comma-separated (default: every shape of issue 3's bars)")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    import cupy as cp
    import torch

    from shardtune.database.reference import open_any

    todo = [r for r in bar_rows(open_any(a.db), a.device)
            if "knobs" in r and (not a.shapes or f"{r['N']}x{r['K']}" in a.shapes.split(","))]
    mod = cp.RawModule(code=KERNELS, options=("-std=c++17",),
                       name_expressions=sorted({instance(r, major) for r in todo for major in (False, True)}))
    stream = torch.cuda.Stream()
    cs = cp.cuda.ExternalStream(stream.cuda_stream)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sink = cp.zeros(1, dtype=cp.uint32)
    out = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.UTC).isoformat(),
           "command": " ".join(shlex.quote(x) for x in ["python3", *sys.argv]), "shapes": []}
    for r in todo:
        N, W, k = r["N"], r["K"] // 8, r["knobs"]
        step = k["tx"] * k["vec"] * k["unroll"]
        words = -(-W // step) * step * N                      # step-major pads the last step
        size = words * 4 + words // 4 * 2
        copies = max(2, int(np.ceil(ROTATE_BYTES / size)))
        # the weights' buffer also serves the flat read of weights and scales together
        bufs = [(torch.randint(0, 2**31, (words + words // 8 + 4,), dtype=torch.int32, device="cuda"),
                 torch.randint(0, 2**15, (words // 4,), dtype=torch.int16, device="cuda")) for _ in range(copies)]
        pair = pair_rows(r)
        entry = {"template": r["template"], "N": N, "K": r["K"], "knobs": k, "record_us": r["us"], "copies": copies,
                 "bytes": N * W * 4 + N * W // 4 * 2}
        for label, major in (("row_major", False), ("step_major", True)):
            fn = mod.get_function(instance(r, major))

            def body(i, fn=fn):
                with cs:
                    fn((N // pair // k["rows"],), (k["tx"], k["rows"]),
                       (bufs[i][0].data_ptr(), bufs[i][1].data_ptr(), np.int32(N), sink))

            entry[label + "_us"] = graph_timing.graph_us(body, copies, stream, rounds=2)
        flat = mod.get_function("flat_read")
        n16 = entry["bytes"] // 16
        best = None
        for threads, waves in ((256, None), (512, None), (256, 4), (512, 2)):   # one pass, or grid-stride
            grid = -(-n16 // threads) if waves is None else waves * sms * (2048 // threads)

            def body(i, grid=grid, threads=threads):
                with cs:
                    flat((grid,), (threads,), (bufs[i][0].data_ptr(), np.int64(n16), sink))

            us = graph_timing.graph_us(body, copies, stream, rounds=2)
            best = us if best is None else min(best, us)
        entry["flat_us"] = best
        out["shapes"].append(entry)
        print(f"{r['template']:24s} {N:6d}x{r['K']:<6d} record {r['us']:7.2f} us  row-major read {entry['row_major_us']:7.2f}"
              f"  step-major {entry['step_major_us']:7.2f}  flat {best:7.2f}", flush=True)
        bufs.clear()
        torch.cuda.empty_cache()
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
