"""Random weights made on the device: a hash of (element index, seed) per element.

A 70B benchmark then needs no 40 GB parameter file and no host-to-device copy, and a
build made on a machine without a GPU carries only its library and config. The fill
functions are compiled into the model library, so loading needs no compiler."""
from __future__ import annotations

from tvm.script import tirx as T

FILL_DTYPES = ("uint32", "float16", "float32")
THREADS = 256


def fill_name(dtype: str) -> str:
    return f"shardtune_fill_{dtype}"


def _mix(i, seed):
    # murmur3's finaliser: neighbouring indices get unrelated bits
    h = T.Cast("uint32", i) * T.uint32(0x9E3779B1) ^ seed
    h = (h ^ (h >> T.uint32(16))) * T.uint32(0x85EBCA6B)
    h = (h ^ (h >> T.uint32(13))) * T.uint32(0xC2B2AE35)
    return h ^ (h >> T.uint32(16))


def fill_func(dtype: str, gpu: bool):
    """out[i] = hash bits (uint32), or uniform in [lo, hi) (floats)."""
    def value(i, seed, lo, hi):
        if dtype == "uint32":
            return _mix(i, seed)
        u = T.Cast("float32", _mix(i, seed) >> T.uint32(8)) * T.float32(1.0 / (1 << 24))
        return T.Cast(dtype, lo + (hi - lo) * u)

    if gpu:
        @T.prim_func
        def fill(var_out: T.handle, seed: T.uint32, lo: T.float32, hi: T.float32):
            n = T.int64()
            out = T.match_buffer(var_out, (n,), dtype)
            for bx in T.thread_binding((n + THREADS - 1) // THREADS, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    if bx * THREADS + tx < n:
                        out[bx * THREADS + tx] = value(bx * THREADS + tx, seed, lo, hi)
    else:
        @T.prim_func
        def fill(var_out: T.handle, seed: T.uint32, lo: T.float32, hi: T.float32):
            n = T.int64()
            out = T.match_buffer(var_out, (n,), dtype)
            for i in T.parallel(n):
                out[i] = value(i, seed, lo, hi)
    return fill.with_attr("global_symbol", fill_name(dtype)).with_attr("tirx.is_scheduled", True)


def add_fill_functions(mod, target) -> None:
    from ..kernels.template import target_is_gpu

    for dtype in FILL_DTYPES:
        mod[fill_name(dtype)] = fill_func(dtype, target_is_gpu(target))


def value_range(name: str, dtype: str) -> tuple[float, float]:
    """Ranges that keep random activations finite in fp16 through a deep model."""
    if name.endswith("norm.weight"):
        return 0.9, 1.1
    if name.endswith(".qscale"):
        return 0.0005, 0.002
    if name.startswith("embed"):
        return -0.05, 0.05
    return -0.02, 0.02
