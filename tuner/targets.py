"""GPU/CPU architectures by name, their TVM targets, and what this machine has."""
from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Arch:
    name: str        # what users type and records store: "sm_90", "gfx1100", "x86_64"
    vendor: str      # "nvidia", "amd", "cpu"
    warp: int        # threads per warp / wavefront
    target: dict     # TVM target as a JSON dict (0.27 refuses target strings with options)


def _cuda(sm: str) -> Arch:
    return Arch(sm, "nvidia", 32, {"kind": "cuda", "arch": sm, "max_threads_per_block": 1024,
                                    "max_shared_memory_per_block": 49152, "thread_warp_size": 32})


def _rocm(gfx: str, warp: int) -> Arch:
    return Arch(gfx, "amd", warp, {"kind": "rocm", "mcpu": gfx, "max_threads_per_block": 1024,
                                    "max_shared_memory_per_block": 65536, "thread_warp_size": warp})


def host_arch() -> Arch:
    from tvm.target import codegen

    # Name the host CPU: generic x86-64 lacks F16C and turns every fp16 conversion into a call.
    return Arch(platform.machine() or "cpu", "cpu", 1,
                {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1})


ARCHES: dict[str, Arch] = {a.name: a for a in [
    _cuda("sm_80"), _cuda("sm_86"), _cuda("sm_89"), _cuda("sm_90"),
    _rocm("gfx90a", 64), _rocm("gfx942", 64), _rocm("gfx1100", 32),
]}


def get_arch(name: str) -> Arch:
    """`cpu` (or the host's machine name) means the host CPU."""
    host = host_arch()
    if name in ("cpu", host.name):
        return host
    try:
        return ARCHES[name]
    except KeyError:
        raise UserError(f"unknown arch {name!r}: use one of cpu, {', '.join(ARCHES)}") from None


# Debian's rocm-device-libs put the device bitcode here; TVM only uses ROCM_PATH to find it.
DEBIAN_ROCM_PATH = "/usr/lib/x86_64-linux-gnu"


def prepare_rocm() -> None:
    """Point TVM's ROCm backend at the device bitcode and check the linker it needs, so a
    missing piece is one clear line here instead of a failure inside every build."""
    if not os.environ.get("ROCM_PATH") and os.path.isdir(os.path.join(DEBIAN_ROCM_PATH, "amdgcn", "bitcode")):
        os.environ["ROCM_PATH"] = DEBIAN_ROCM_PATH
    root = os.environ.get("ROCM_PATH", "/opt/rocm")
    if not os.path.isdir(os.path.join(root, "amdgcn", "bitcode")):
        raise UserError(f"AMD code generation needs the ROCm device bitcode (no {root}/amdgcn/bitcode): "
                        "install ROCm, or Debian's rocm-device-libs and lld-22, or set ROCM_PATH")
    if not any(shutil.which(f"ld.lld{v}") for v in ("", "-22", "-21", "-20", "-19", "-18", "-17")):
        raise UserError("AMD code generation needs ld.lld 17 or newer (Debian: lld-22)")


def target_of(arch: Arch):
    import tvm

    if arch.vendor == "amd":
        prepare_rocm()
    return tvm.target.Target(arch.target)


def local_gpu_arch() -> str | None:
    """The arch name of local GPU 0, or None without a usable GPU."""
    import tvm

    try:
        dev = tvm.cuda(0)
        if dev.exist:
            return "sm_" + dev.compute_version.replace(".", "")
        dev = tvm.rocm(0)
        if dev.exist:
            return dev.device_name  # e.g. gfx1100
    except Exception:  # a driver-less machine: no GPU to speak of
        return None
    return None


def local_gpus() -> list[dict]:
    """Name, arch and compute units of every visible GPU (none is a fine answer)."""
    import tvm

    gpus = []
    for make in (tvm.cuda, tvm.rocm):
        for i in range(16):
            try:
                dev = make(i)
                if not dev.exist:
                    break
                arch = ("sm_" + dev.compute_version.replace(".", "")) if make is tvm.cuda else dev.device_name
                gpus.append({"index": i, "name": dev.device_name, "arch": arch,
                             "compute_units": dev.multi_processor_count})
            except Exception:
                break
    return gpus
