#!/bin/bash
# The bulk-copy (TMA) and PDL read probe (read_tma_pdl_probe.cu): built with nvcc and run on the
# device, its JSON into $OUT. Needs no TVM. Usage: bash benchmarks/device_read_probe.sh [MB,...]
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/read_tma_pdl_probe benchmarks/read_tma_pdl_probe.cu || exit 1
/tmp/read_tma_pdl_probe "$@" > "$OUT/read_tma_pdl.json" 2> >(tee "$OUT/read_tma_pdl.log" >&2)
