"""Which change to a tuned GEMV's generated CUDA would make it faster? On the local GPU: the best
H100 record of some q4f16_1 GEMV shapes, built by TVM, its CUDA source edited by text and compiled
by nvcc, every variant timed the way the tuner times (back to back in a CUDA graph over rotating
copies, cold L2) in the same run, its output compared with the unedited kernel's:

  orig      the source as TVM generates it
  w_cs      weight loads as `ld.global.cs` (evict first: the weights are read once; x, read by
            every block, keeps L1)
  w_na      weight loads as `ld.global.nc.L1::no_allocate`
  ws_cs     weight and scale loads as `ld.global.cs`
  dot8_w    `st_q4_dot8` pairing nibbles 2m, 2m+1 (one byte_perm of the weight word) with the x pair
            (x[2m], x[2m+1]) that sits in one register already, instead of nibbles i, i+4 with a
            byte_perm of x: 16 instructions a word instead of 19 (the output differs in rounding)
  hoist     every weight and scale load of an unrolled K loop (k_loop=unrolled) written first, each
            into a register array of its own, before the math: ptxas otherwise issues only some of
            them before the first dot product (benchmarks/gemv_sass.py). Kernels whose loads sit
            in a loop or under a guard are left as they are
  hoist_dep hoist, and then a store that never happens (its pointer test fails) of all loaded words
            XORed: ptxas must then issue every load before the math, where it otherwise interleaves
            them again (gemv_sass.py: 7 of 16 loads before the first use with hoist, 16 with this)
  lop3      st_q4_dot8's mask and magic-number OR as one `lop3` (ptxas emits two LOP3s for
            `(w & 0x000F000F) | 0x64006400`, one immediate each): the same math, 11% fewer
            instructions in the tuned 8192x7168 kernel (gemv_sass.py)
  interleave  weights repacked on the host so that one mask gives the values 2i, 2i + 1 (nibble j of
            a word holds value INTERLEAVE[j]), st_q4_dot8 pairing them with the x pair (x[2i],
            x[2i+1]) that sits in one register: 4 byte permutes a word fewer; interleave_lop3 with
            lop3 too. The output differs from orig's in rounding only (the half2 lanes sum other pairs)
  lb        __launch_bounds__(T, 2048 / T): registers capped so that an SM holds 2048 threads
  *_lb      lop3_lb, interleave_lop3_lb: the same cap, so that the registers the edit adds do not
            cost occupancy
  nomath    a bound, not a kernel: st_q4_dot8 returns bits of the weight word, no dequantize and no
            dot product, so nvcc drops the x loads; every weight and scale load stays. If this is not
            much faster than orig, the loads' pattern, not the math, sets the pace
  nomath_x  the same with the x loads kept (an XOR of the eight halves' bits)
  l2pf      at its start, one thread of each block asks for the block's rows of weights and scales
            (contiguous) to be brought into L2 (`cp.async.bulk.prefetch.L2`, sm_90): every byte the
            block reads is in flight at once, with no register held for it. Not the gate/up GEMV,
            whose pair rows lie apart
  persist   one wave of blocks (as many as the SMs hold at once, by registers, threads and shared
            memory), each looping over row tiles: a block's activation copy to shared memory and
            its launch serve several tiles, and no partial last wave is left
  persist2  the same with half a wave of blocks, each looping over twice the tiles

A probe, not a schedule: what pays goes into the templates. Needs torch and CuPy. With --once, each
variant runs once and is not timed: for Nsight Compute (`ncu --launch-count 4`), which profiles
every launch.

    python3 benchmarks/gemv_source_probe.py database/reference/sm_90.jsonl --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import sys
import tempfile

import numpy as np

import graph_timing   # beside this script
from gemv_bars import rows as bar_rows

SHAPES = ["8192x7168", "8192x11008", "8000x8192", "10240x8192", "8192x8192", "11008x8192", "5120x8192",
          "8192x5504", "8192x28672"]
ROTATE_BYTES = 400e6
NO_ALLOCATE = r"""
__device__ __forceinline__ uint ld_na(const uint* p) {
  uint v; asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p)); return v; }
__device__ __forceinline__ uint2 ld_na(const uint2* p) {
  uint2 v; asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p)); return v; }
__device__ __forceinline__ uint4 ld_na(const uint4* p) {
  uint4 v; asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p)); return v; }
"""

# Bounds, not kernels: the dequantize-and-dot math removed, every load of TVM's kernel kept. `nomath`
# keeps a dependence on the weight word only (nvcc then drops the x loads), `nomath_x` on x too (an
# XOR of the eight halves' bits). A few instructions a word instead of about 19.
NOMATH = r"""
__device__ __forceinline__ float st_q4_dot8(unsigned int w, half x0, half x1, half x2, half x3,
                                            half x4, half x5, half x6, half x7) {
  return __uint_as_float(w & 0x007FFFFFu);
}
"""
NOMATH_X = r"""
__device__ __forceinline__ float st_q4_dot8(unsigned int w, half x0, half x1, half x2, half x3,
                                            half x4, half x5, half x6, half x7) {
  unsigned int x = __half_as_ushort(x0) ^ __half_as_ushort(x1) ^ __half_as_ushort(x2) ^ __half_as_ushort(x3)
                 ^ __half_as_ushort(x4) ^ __half_as_ushort(x5) ^ __half_as_ushort(x6) ^ __half_as_ushort(x7);
  return __uint_as_float((w ^ x) & 0x007FFFFFu);
}
"""


def _closing(src: str, i: int, pair: str) -> int:
    """Index of the bracket closing the one at src[i]."""
    depth = 0
    for j in range(i, len(src)):
        depth += (src[j] == pair[0]) - (src[j] == pair[1])
        if depth == 0:
            return j
    raise ValueError("unbalanced")


def wrap_loads(src: str, buf: str, fn: str) -> str:
    """Every read of `buf` (`*(T*)(buf + e)` or `buf[e]`) as `fn((const T*)(buf + e))`."""
    out, i = [], 0
    pattern = re.compile(r"\*\((\w+)\*\)\(" + buf + r" \+|\b" + buf + r"\[")
    while (m := pattern.search(src, i)) is not None:
        out.append(src[i:m.start()])
        if m.group(1):        # *(T*)(buf + e): the parenthesis opened at the end of "*(T*)("
            open_at = m.start() + len(f"*({m.group(1)}*)")
            end = _closing(src, open_at, "()")
            out.append(f"{fn}((const {m.group(1)}*){src[open_at:end + 1]})")
        else:                 # buf[e]
            open_at = m.end() - 1
            end = _closing(src, open_at, "[]")
            out.append(f"{fn}({buf} + ({src[open_at + 1:end]}))")
        i = end + 1
    return "".join(out) + src[i:]


DOT8_BYTE_PAIRS = r"""
__device__ __forceinline__ float st_q4_dot8(unsigned int w, half x0, half x1, half x2, half x3,
                                            half x4, half x5, half x6, half x7) {
  // byte m of w in both halves; low nibble of the low half, high nibble of the high half:
  // halves 1024 + q and 1024 + 16 q, then (q - 7) = v * (1, 1/16) - (1031, 71)
  const half2 xs[4] = {__halves2half2(x0, x1), __halves2half2(x2, x3), __halves2half2(x4, x5),
                       __halves2half2(x6, x7)};
  const half2 mul = __halves2half2(__ushort_as_half(0x3C00), __ushort_as_half(0x2C00));   // 1, 1/16
  const half2 sub = __halves2half2(__ushort_as_half(0xE407), __ushort_as_half(0xD470));   // -1031, -71
  half2 acc = __float2half2_rn(0.0f);
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    unsigned int bits = (__byte_perm(w, 0u, 0x4040 + 0x101 * m) & 0x00F0000Fu) | 0x64006400u;
    half2 q = __hfma2(*reinterpret_cast<half2*>(&bits), mul, sub);
    acc = __hfma2(xs[m], q, acc);
  }
  return __low2float(acc) + __high2float(acc);
}
"""


_LOAD = re.compile(r"^( *)(\*\((uint\d?)\*\)\(wq_local_ptr \+ 0\) = \*\(uint\d?\*\)\(wq_ptr \+ (.+)\)|wq_local_ptr\[0\] = wq_ptr\[(.+)\]);$", re.M)
_INVARIANT = re.compile(r"^[\s\d()+*/%<>&|-]*(?:(?:\(\(int\)(?:threadIdx|blockIdx)\.[xyz]\))[\s\d()+*/%<>&|-]*)*$")


def hoist_loads(src: str) -> str | None:
    """All weight loads of the kernel (one per step of an unrolled K loop), and then its scale loads,
    moved up to the first weight load's place, each into its own registers; None where a load's
    address depends on a loop or a load sits under a guard (moving it could read out of bounds)."""
    loads = list(_LOAD.finditer(src))
    if len(loads) < 2 or any(len(m.group(1)) != 2 for m in loads):   # deeper: inside a loop or a guard
        return None
    if not all(_INVARIANT.match(m.group(4) or m.group(5)) for m in loads):
        return None
    words = int(re.search(r"uint wq_local_ptr\[(\d+)\];", src).group(1))
    head, pieces = src[:loads[0].start()], []
    hoisted = [f"  alignas(16) uint wq_h{n}[{words}];\n" for n in range(len(loads))]
    for n, m in enumerate(loads):
        end = loads[n + 1].start() if n + 1 < len(loads) else len(src)
        hoisted.append("  " + m.group(2).replace("wq_local_ptr", f"wq_h{n}") + ";\n")
        pieces.append(src[m.end() + 1:end].replace("wq_local_ptr", f"wq_h{n}"))
    body = "".join(pieces)
    scales: dict[str, str] = {}

    def scale(m):
        if not _INVARIANT.match(m.group(1)):
            return m.group(0)
        return scales.setdefault(m.group(1), f"sc_h{len(scales)}")
    body = re.sub(r"scale_ptr\[([^\[\]]+)\]", scale, body)
    hoisted += [f"  half {name} = scale_ptr[{expr}];\n" for expr, name in scales.items()]
    return head + "".join(hoisted) + body


def with_load_dependence(hoisted: str) -> str:
    """`hoisted` (hoist_loads) with every hoisted register read by a store that never runs, placed
    before the first barrier (or the first math): ptxas cannot sink a load past it."""
    words = [f"{w}[{j}]" for w, n in re.findall(r"alignas\(16\) uint (wq_h\d+)\[(\d+)\];", hoisted) for j in range(int(n))]
    scales = [f"(uint)__half_as_ushort({s})" for s in re.findall(r"half (sc_h\d+) = scale_ptr", hoisted)]
    last = list(re.finditer(r"^  (half sc_h\d+ = |\*\(uint\d?\*\)\(wq_h\d+ \+ 0\) = |wq_h\d+\[0\] = wq_ptr).*\n", hoisted, re.M))[-1]
    at = last.end()
    never = ("  if (wq_ptr == nullptr) { ((uint*)y_ptr)[0] = " + " ^ ".join(words + scales) + "; }\n")
    return hoisted[:at] + never + hoisted[at:]


def kernel_body(src: str) -> int:
    """Index of the opening brace of the kernel's definition (TVM declares it first, then defines it)."""
    declared = src.find('extern "C" __global__')
    return src.find("{", src.find('extern "C" __global__ void __launch_bounds__', declared + 1))


def l2_prefetch(src: str, rows: int, K: int) -> str:
    """The kernel with a bulk L2 prefetch of the block's weight rows (rows * K / 2 bytes) and scale
    rows (rows * K / 16 bytes) at its start."""
    open_at = kernel_body(src)
    prefetch = f"""
  if (threadIdx.x == 0 && threadIdx.y == 0) {{
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(wq_ptr + (size_t)blockIdx.x * {rows * K // 8}), "r"({rows * K // 2}) : "memory");
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(scale_ptr + (size_t)blockIdx.x * {rows * K // 32}), "r"({rows * K // 16}) : "memory");
  }}"""
    return src[:open_at + 1] + prefetch + src[open_at + 1:]


def persistent(src: str, tiles: int) -> str | None:
    """The kernel with its row tiles (blockIdx.x) in a loop over the grid's blocks; None if some code
    before the first accumulator reset (kept outside the loop: declarations, the activation copy)
    depends on the tile."""
    body = kernel_body(src)
    start = src.find("  acc_rf_local_ptr[0] = 0x0p+0f", body)
    end = src.find("\n}\n", start)
    if start < 0 or "blockIdx" in src[body:start]:
        return None
    loop = src[start:end].replace("((int)blockIdx.x)", "tile")
    return (src[:start] + f"  for (int tile = blockIdx.x; tile < {tiles}; tile += gridDim.x) {{\n" + loop
            + "\n  __syncthreads();   // the reduction buffers of this tile read before the next's writes\n  }" + src[end:])


LOP3_C = "    unsigned int bits = ((w >> (4 * i)) & 0x000F000Fu) | 0x64006400u;\n"
LOP3_ASM = ("    unsigned int bits;   // (w & mask) | magic, one instruction\n"
            '    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(bits) : "r"(w >> (4 * i)), "n"(0x000F000F), "r"(0x64006400));\n')


def variants(src: str, rows: int = 0, K: int = 0, pairs: bool = True, tiles: int = 0) -> dict[str, str]:
    at = src.find('extern "C" __global__')
    with_na = src[:at] + NO_ALLOCATE + src[at:]
    out = {"orig": src, "w_cs": wrap_loads(src, "wq_ptr", "__ldcs"), "w_na": wrap_loads(with_na, "wq_ptr", "ld_na"),
           "ws_cs": wrap_loads(wrap_loads(src, "wq_ptr", "__ldcs"), "scale_ptr", "__ldcs"),
           "lb": full_occupancy(src)}
    if "float st_q4_dot8(" in src:   # the helper these replace (decode=f16x2, as every record has)
        out.update(dot8_w=with_helper(src, DOT8_BYTE_PAIRS), nomath=with_helper(src, NOMATH),
                   nomath_x=with_helper(src, NOMATH_X))
    if LOP3_C in src:
        out["lop3"] = src.replace(LOP3_C, LOP3_ASM)
        out["interleave"] = src.replace(PAIR_C, PAIR_ADJACENT)
        out["interleave_lop3"] = out["lop3"].replace(PAIR_C, PAIR_ADJACENT)
    for name in ("lop3", "interleave_lop3"):
        if name in out:
            out[name + "_lb"] = full_occupancy(out[name])
    if hoisted := hoist_loads(src):
        out.update(hoist=hoisted, hoist_dep=with_load_dependence(hoisted))
    if not pairs:
        out["l2pf"] = l2_prefetch(src, rows, K)
    if tiles and (persist := persistent(src, tiles)):
        out.update(persist=persist, persist2=persist)
    return out


#: The variants that read the weights packed otherwise (nibble j of a word holds value INTERLEAVE[j]),
#: so that nibbles j and j + 4, which one mask takes into the two halves of a half2, are values 2i
#: and 2i + 1: the x pair then sits in one register already, no byte permute needed.
INTERLEAVE = [0, 2, 4, 6, 1, 3, 5, 7]
PAIR_C = "__halves2half2(xs[i], xs[i + 4])"
PAIR_ADJACENT = "__halves2half2(xs[2 * i], xs[2 * i + 1])"
REPACKED = {"interleave", "interleave_lop3", "interleave_lop3_lb"}


def full_occupancy(src: str) -> str:
    """`__launch_bounds__(T)` as `__launch_bounds__(T, 2048 / T)`: ptxas then keeps the registers
    low enough for an SM to hold 2048 threads (at 512 threads a block, 32 registers, where 33 cost a
    quarter of the blocks), spilling if it must."""
    return re.sub(r"__launch_bounds__\((\d+)\)", lambda m: f"__launch_bounds__({m.group(1)}, {min(32, 2048 // int(m.group(1)))})", src)


def interleave(wq, order=INTERLEAVE):
    """Words (torch int32) with nibble j taken from nibble order[j] of the input."""
    out = wq.new_zeros(wq.shape)
    for j, src_nibble in enumerate(order):
        out |= ((wq >> (4 * src_nibble)) & 0xF) << (4 * j)
    return out


def with_helper(src: str, helper: str) -> str:
    """`src` with its st_q4_dot8 definition replaced by `helper`."""
    start = src.find("__device__ __forceinline__ float st_q4_dot8(")
    end = src.find("\n}\n", start) + 3
    return src[:start] + helper.strip() + "\n" + src[end:]


def one_wave(fn, threads: int) -> int:
    """Blocks of `fn` the GPU holds at once (the driver's occupancy calculator)."""
    import cupy as cp

    try:
        per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, 0)
    except AttributeError:   # H100's limits by hand (registers in 256-per-warp chunks)
        regs, smem = fn.num_regs, fn.shared_size_bytes
        warps = -(-threads // 32)
        per_sm = min(32, 2048 // threads, 65536 // (warps * -(-regs * 32 // 256) * 256), 233472 // (smem + 1024))
    return cp.cuda.Device().attributes["MultiProcessorCount"] * per_sm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db")
    ap.add_argument("--device", default="H100")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="NxK, comma-separated")
    ap.add_argument("--variants", default="orig,w_cs,w_na,ws_cs,dot8_w", help="comma-separated, orig first")
    ap.add_argument("--shapes-all", action="store_true", help="every shape of issue 3's bars")
    ap.add_argument("--once", action="store_true", help="run each variant once, untimed (for ncu)")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    import cupy as cp
    import torch
    import tvm
    from tvm.support import nvcc

    from shardtune.database.reference import open_any
    from shardtune.kernels import get_template
    from shardtune.tuner.measure import generated_source
    from shardtune.tuner.targets import get_arch, target_of

    target = target_of(get_arch("sm_90"))
    stream = torch.cuda.Stream()
    cs = cp.cuda.ExternalStream(stream.cuda_stream)
    wanted = a.shapes.split(",")
    out = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.UTC).isoformat(),
           "command": " ".join(shlex.quote(x) for x in ["python3", *sys.argv]), "shapes": []}
    for row in bar_rows(open_any(a.db), a.device):
        if (f"{row['N']}x{row['K']}" not in wanted and not a.shapes_all) or "knobs" not in row:
            continue
        tpl, knobs = get_template(row["template"]), row["knobs"]
        wl = {"batch": 1, "N": row["N"], "K": row["K"], "quant": "q4f16_1"}
        with target:
            src = generated_source(tvm.compile(tpl.schedule(wl, knobs, target), target=target))
        name = re.search(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\(', src).group(1)
        params = re.findall(r"(\w+)_ptr[,)]", src[src.find(name + "("):src.find("{", src.find(name + "("))])
        inputs = dict(zip(["x", "wq", "scale", *(["residual"] if tpl.epilogue == "residual" else []), "y"],
                          tpl.inputs(wl, np.random.default_rng(0))))
        size = sum(v.nbytes for v in inputs.values())
        copies = max(2, int(np.ceil(ROTATE_BYTES / size)))
        sets = [{k: torch.from_numpy(v.view(np.int32) if v.dtype == np.uint32 else v).cuda() for k, v in inputs.items()}
                for _ in range(copies)]
        outputs = tpl.outputs(wl)
        block = (knobs["tx"], knobs["rows"])
        entry = {"template": tpl.name, "N": row["N"], "K": row["K"], "knobs": knobs, "record_us": row["us"],
                 "bytes": tpl.bytes_moved(wl), "variants": {}}
        reference = None
        for vname, code in ((v, c) for v, c in variants(src, knobs["rows"], row["K"], tpl.epilogue == "silu_mul",
                                                                     outputs // knobs["rows"]).items()
                                if v in a.variants.split(",")):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f, target:   # nvcc's -arch: the target's
                f.write(nvcc.compile_cuda(code, target_format="cubin", compiler="nvcc"))
                f.flush()
                fn = cp.RawModule(path=f.name).get_function(name)
            grid = (outputs // knobs["rows"],)
            if vname.startswith("persist"):
                grid = (min(grid[0], one_wave(fn, knobs["rows"] * knobs["tx"]) // (2 if vname == "persist2" else 1)),)

            def body(i, fn=fn, grid=grid):
                with cs:
                    fn(grid, block, tuple(sets[i][p].data_ptr() for p in params))

            if vname in REPACKED:   # the weights as this variant reads them, put back after it
                for st in sets:
                    st["wq"] = interleave(st["wq"])
            sets[0]["y"].fill_(float("nan"))
            # the repack and the fill run on torch's stream, the kernel on ours: let them finish first
            torch.cuda.synchronize()
            body(0)
            torch.cuda.synchronize()
            result = sets[0]["y"].cpu().numpy()
            reference = result if reference is None else reference
            ref64, res64 = reference.astype(np.float64), result.astype(np.float64)
            rel = float(np.linalg.norm(res64 - ref64) / np.linalg.norm(ref64)) if np.isfinite(res64).all() else float("inf")
            us = float("nan") if a.once else graph_timing.graph_us(body, copies, stream, rounds=2)
            if vname in REPACKED:
                for st in sets:
                    st["wq"] = interleave(st["wq"], [INTERLEAVE.index(j) for j in range(8)])
            entry["variants"][vname] = {"us": us, "rel_error_vs_orig": rel, "grid": grid[0]}
            print(f"{tpl.name:24s} {row['N']:6d}x{row['K']:<6d} {vname:6s} {us:7.2f} us"
                  f" (record {row['us']:.2f})  rel. error against orig {rel:.1e}", flush=True)
        out["shapes"].append(entry)
        sets.clear()
        torch.cuda.empty_cache()
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
