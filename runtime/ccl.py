"""Build and load the disco CCL backend (ccl.cc): NCCL on CUDA, RCCL on ROCm.

The PyPI TVM wheel has the disco runtime but no backend, so `runtime.disco.nccl.*` is
missing. `load_ccl()` compiles ccl.cc once per machine (tvm_ffi caches the library) and
loads it, which registers the functions. Every process that hosts a disco worker calls it:
the controller (worker 0 is a thread there) and each worker process (disco_worker.py)."""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

from ..errors import UserError

HERE = Path(__file__).parent
_loaded: dict[str, object] = {}


def _site_dirs() -> list[str]:
    return [p for p in sys.path if p.endswith("site-packages") or p.endswith("dist-packages")]


def _first(patterns: list[str]) -> str | None:
    for pattern in patterns:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def _cuda_flags() -> tuple[list[str], list[str], list[str]]:
    site = _site_dirs()
    nccl_h = _first([f"{s}/nvidia/nccl/include/nccl.h" for s in site] + ["/usr/include/nccl.h"])
    nccl_so = _first([f"{s}/nvidia/nccl/lib/libnccl.so*" for s in site]
                     + ["/usr/lib/x86_64-linux-gnu/libnccl.so*"])
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cuda_h = _first([f"{cuda_home}/include/cuda_runtime.h", "/usr/local/cuda*/include/cuda_runtime.h"]
                    + [f"{s}/nvidia/cu*/include/cuda_runtime.h" for s in site]
                    + [f"{s}/nvidia/cuda_runtime/include/cuda_runtime.h" for s in site])
    cudart = _first([f"{cuda_home}/lib64/libcudart.so*", "/usr/local/cuda*/lib64/libcudart.so*"]
                    + [f"{s}/nvidia/cu*/lib/libcudart.so*" for s in site]
                    + [f"{s}/nvidia/cuda_runtime/lib/libcudart.so*" for s in site])
    missing = [what for what, found in [("nccl.h (pip install nvidia-nccl-cu13)", nccl_h),
                                        ("libnccl.so", nccl_so), ("cuda_runtime.h (CUDA toolkit)", cuda_h),
                                        ("libcudart.so", cudart)] if not found]
    if missing:
        raise UserError(f"cannot build the NCCL backend for multi-GPU runs: {', '.join(missing)} not found")
    includes = [str(Path(nccl_h).parent), str(Path(cuda_h).parent)]
    libs = [nccl_so, cudart]
    return includes, libs, []


def _rocm_flags() -> tuple[list[str], list[str], list[str]]:
    rocm = os.environ.get("ROCM_PATH", "/opt/rocm")
    rccl_so = _first([f"{rocm}/lib/librccl.so*"])
    hip_so = _first([f"{rocm}/lib/libamdhip64.so*"])
    if not (rccl_so and hip_so and Path(f"{rocm}/include/rccl/rccl.h").is_file()):
        raise UserError(f"cannot build the RCCL backend: RCCL or HIP not found under ROCM_PATH={rocm}")
    return [f"{rocm}/include"], [rccl_so, hip_so], ["-DSHARDTUNE_RCCL", "-D__HIP_PLATFORM_AMD__"]


def load_ccl(device_type: str = "cuda"):
    """Build (first time) and load the backend for `device_type` ('cuda' or 'rocm'): the name
    of the CCL to pass to `Session.init_ccl`."""
    name = "nccl" if device_type == "cuda" else "rccl"
    if name in _loaded:
        return name
    import tvm
    import tvm_ffi.cpp

    includes, libs, defines = _cuda_flags() if device_type == "cuda" else _rocm_flags()
    tvm_dir = Path(tvm.__file__).parent
    tvm_lib = tvm_dir / "lib"
    ldflags = [f"-L{tvm_lib}", f"-Wl,-rpath,{tvm_lib}", "-ltvm_runtime_extra", "-ltvm_runtime"]
    for lib in libs:   # by full path: pip wheels ship only the versioned names (libnccl.so.2)
        ldflags += [lib, f"-Wl,-rpath,{Path(lib).parent}"]
    _loaded[name] = tvm_ffi.cpp.load_inline(
        f"shardtune_{name}", cpp_sources=(HERE / "ccl.cc").read_text(),
        extra_cflags=["-O2", *defines], extra_ldflags=ldflags,
        extra_include_paths=[str(HERE / "ccl_include"), str(tvm_dir / "include"), *includes])
    return name
