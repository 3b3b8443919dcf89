"""How fast can any kernel read N bytes, timed the way the tuner times ours?

The GEMV and attention bars ask for a share of the device's copy bandwidth (a 512 MB copy). A kernel
of 5-50 MB also pays a launch, a ramp while its first loads are in flight and a tail; this probe
measures what is left of the bandwidth after those, with nothing else in the kernel: a pure read
(XOR of 16-byte loads, no writes) over a sweep of grid sizes, threads and loads in flight per
thread, back to back in a CUDA graph over rotating copies (cold L2), as `tuner/measure.py` times
templates. The best setting per size is the speed of light for a kernel that must read those bytes.

Also timed: the same read followed by a second, tiny kernel that reduces the first one's per-block
partials (the shape of decode attention's two kernels), and the 512 MB copy the bars refer to.
Needs CuPy and torch, not TVM. Usage: python benchmarks/read_speed_of_light.py [--json FILE]"""
import argparse
import datetime
import itertools
import json
import sys

import numpy as np

import graph_timing   # beside this script

KERNELS = r"""
template <int U>
__device__ void read_xor(const uint4* __restrict__ p, long long n, unsigned* partial, bool always_write) {
  unsigned acc = 0;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + (U - 1) * stride < n; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; u++) v[u] = __ldcs(p + i + u * stride);   // streaming: no reuse
#pragma unroll
    for (int u = 0; u < U; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) { uint4 v = __ldcs(p + i); acc ^= v.x ^ v.y ^ v.z ^ v.w; }
  // A write the compiler cannot drop; in the read-only case it (almost) never happens.
  if (always_write) {
    acc ^= __shfl_xor_sync(0xffffffff, acc, 16);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
  } else if (acc == 0x9e3779b9u) {
    partial[0] = acc;
  }
}
#define READ(U) \
  extern "C" __global__ void read_u##U(const uint4* p, long long n, unsigned* partial) { read_xor<U>(p, n, partial, false); } \
  extern "C" __global__ void part_u##U(const uint4* p, long long n, unsigned* partial) { read_xor<U>(p, n, partial, true); }
READ(1) READ(2) READ(4) READ(8)
extern "C" __global__ void merge(const unsigned* partial, int n, unsigned* out) {
  unsigned acc = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc ^= partial[i];
  for (int o = 16; o; o >>= 1) acc ^= __shfl_xor_sync(0xffffffff, acc, o);
  if (threadIdx.x == 0) out[0] = acc;
}
"""
# Bytes of the shapes issue 3 and 4 name: q4f16_1 weights + scales (N*K*0.5625) and the 70B TP2 KV
# cache at 4096 rows (4 KV heads x 4096 x 128 x 2 x 2 bytes).
SIZES_MB = [2.4, 4.7, 8.39, 9.4, 11.8, 18.9, 23.6, 25.4, 33.0, 47.2, 50.7, 66.1, 101.4, 132.1]
THREADS = (256, 512, 1024)
LOADS = (1, 2, 4, 8)
WAVES = (1, 2, 4, 8)                # grid-stride over waves x SMs x (1024 / threads) blocks
ROTATE_BYTES = 400e6                 # several times the 50 MB L2


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES_MB)), help="MB, comma-separated")
    args = ap.parse_args()
    import cupy as cp
    import torch

    mod = cp.RawModule(code=KERNELS, options=("-std=c++17",))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    stream = torch.cuda.Stream()
    cs = cp.cuda.ExternalStream(stream.cuda_stream)
    out = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.UTC).isoformat(),
           "command": " ".join(["python3 benchmarks/read_speed_of_light.py"] + sys.argv[1:]), "sms": sms}

    def graph_us(body, copies: int) -> float:
        return graph_timing.graph_us(body, copies, stream, rounds=2)

    # The bars' reference: one 512 MB device-to-device copy, bytes read + written, median of 10.
    src = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_times = []
    for _ in range(11):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        copy_times.append(a.elapsed_time(b) / 1e3)
    copy_gbps = 2 * (512 << 20) / float(np.median(copy_times[1:])) / 1e9
    out["copy_512MB_gbps"] = copy_gbps
    print(f"copy 512 MB: {copy_gbps:.0f} GB/s", flush=True)
    del src, dst

    partials = cp.zeros(int(max(map(float, args.sizes.split(","))) * 1e6) // 16 // 256 + 1, dtype=cp.uint32)
    merged = cp.zeros(1, dtype=cp.uint32)
    rows = []
    for mb in (float(s) for s in args.sizes.split(",")):
        n16 = int(mb * 1e6) // 16
        copies = max(2, int(np.ceil(ROTATE_BYTES / (n16 * 16))))
        bufs = [torch.randint(0, 2**31, (n16 * 4,), dtype=torch.int32, device="cuda") for _ in range(copies)]
        results = []
        for threads, loads, waves in itertools.product(THREADS, LOADS, WAVES + (None,)):
            one_pass = -(-n16 // (threads * loads))     # every thread one round of loads, no loop
            # `waves` x the blocks of 1024 threads the SMs hold at once, or one pass (the GEMVs' way)
            grid = one_pass if waves is None else waves * sms * (1024 // threads)
            if grid > one_pass:
                continue
            fn = mod.get_function(f"read_u{loads}")

            def body(i, fn=fn, grid=grid, threads=threads):
                with cs:
                    fn((grid,), (threads,), (bufs[i].data_ptr(), np.int64(n16), partials))

            results.append({"threads": threads, "loads": loads, "grid": grid, "us": graph_us(body, copies)})
        best = min(results, key=lambda r: r["us"])
        # The two-kernel shape of decode attention: the best read writing per-block partials, then
        # one block merging them.
        part = mod.get_function(f"part_u{best['loads']}")
        merge = mod.get_function("merge")

        def pair(i):
            with cs:
                part((best["grid"],), (best["threads"],), (bufs[i].data_ptr(), np.int64(n16), partials))
                merge((1,), (256,), (partials, np.int32(best["grid"]), merged))

        pair_us = graph_us(pair, copies)
        gbps = n16 * 16 / best["us"] / 1e3
        row = {"mb": mb, "copies": copies, "best": best, "read_gbps": gbps, "read_pct_of_copy": 100 * gbps / copy_gbps,
               "with_merge_kernel_us": pair_us, "with_merge_pct_of_copy": 100 * n16 * 16 / pair_us / 1e3 / copy_gbps,
               "settings": results}
        rows.append(row)
        print(f"{mb:7.2f} MB  best {best['us']:7.2f} us ({row['read_pct_of_copy']:5.1f}% of copy; "
              f"{best['threads']} threads, {best['loads']} loads, grid {best['grid']})  "
              f"+ merge kernel {pair_us:7.2f} us ({row['with_merge_pct_of_copy']:5.1f}%)", flush=True)
        bufs.clear()
        torch.cuda.empty_cache()
    out["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
