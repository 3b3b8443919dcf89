"""Does an L2 prefetch issued before a latency-bound kernel make the GEMV after it faster?

A decode step runs small kernels (RoPE, attention, norms, all-reduce) that leave DRAM idle for
microseconds, then a GEMV whose weights nothing depends on. Hopper's `cp.async.bulk.prefetch.L2`
asks for a whole range with one instruction and returns at once. This probe times, in one CUDA
graph over rotating weight copies (cold L2): [idle kernel of ~IDLE us] -> [GEMV], against
[prefetch kernel] -> [idle kernel] -> [GEMV], for a few weight sizes. cuBLAS (torch.matmul) is
the GEMV: the question is the memory system's, not our template's.
Usage: python benchmarks/l2_prefetch_probe.py [--json FILE]"""
import argparse
import datetime
import json
import sys

import numpy as np

import graph_timing   # beside this script

PREFETCH = r"""
extern "C" __global__ void prefetch_l2(const char* p, unsigned long long bytes) {
  const unsigned long long chunk = 1ull << 16;
  unsigned long long n = (bytes + chunk - 1) / chunk;
  for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    unsigned long long off = i * chunk, left = bytes - off;
    unsigned int size = (unsigned int)(left < chunk ? left : chunk);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p + off), "r"(size) : "memory");
  }
}
extern "C" __global__ void idle(long long cycles) {
  long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
}
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--blocks", type=int, default=4, help="thread blocks of the prefetch kernel (64 threads each)")
    args = ap.parse_args()
    import cupy as cp
    import torch

    mod = cp.RawModule(code=PREFETCH, options=("-std=c++17",))
    prefetch, idle = mod.get_function("prefetch_l2"), mod.get_function("idle")
    clock_khz = cp.cuda.runtime.getDeviceProperties(0)["clockRate"]
    dev = torch.device("cuda")
    stream = torch.cuda.Stream()
    out = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.UTC).isoformat(),
           "command": " ".join(["benchmarks/l2_prefetch_probe.py"] + sys.argv[1:]), "rows": []}

    def graph_us(body, copies: int) -> float:
        return graph_timing.graph_us(body, copies, stream, rounds=4)

    for rows, idle_us in ((4096, 0.0), (4096, 4.0), (4096, 8.0), (8192, 8.0), (12288, 8.0)):
        k = 1024                                      # fp16 rows x 1024: 8, 16, 24 MB
        copies = max(4, int(np.ceil(160e6 / (rows * k * 2))))
        ws = [torch.randn(rows, k, dtype=torch.float16, device=dev) for _ in range(copies)]
        x = torch.randn(k, 1, dtype=torch.float16, device=dev)
        y = torch.empty(rows, 1, dtype=torch.float16, device=dev)
        cycles = np.int64(idle_us * 1e-6 * clock_khz * 1e3)
        cs = cp.cuda.ExternalStream(stream.cuda_stream)

        def spin():
            if idle_us:
                with cs:
                    idle((1,), (32,), (cycles,))

        def pf(i):
            with cs:
                prefetch((args.blocks,), (64,), (ws[i].data_ptr(), np.uint64(ws[i].numel() * 2)))

        row = {"prefetch_blocks": args.blocks, "weight_mb": rows * k * 2 / 1e6, "idle_us": idle_us,
               "gemv_alone_us": graph_us(lambda i: torch.matmul(ws[i], x, out=y), copies),
               "idle_then_gemv_us": graph_us(lambda i: (spin(), torch.matmul(ws[i], x, out=y)), copies),
               "prefetch_idle_gemv_us": graph_us(lambda i: (pf(i), spin(), torch.matmul(ws[i], x, out=y)), copies),
               "prefetch_alone_us": graph_us(pf, copies)}
        if idle_us:
            row["idle_alone_us"] = graph_us(lambda i: spin(), copies)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        del ws
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
