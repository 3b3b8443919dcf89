"""`shardtune doctor`: what this installation can do, in a few lines."""
from __future__ import annotations


def _buildable_targets() -> list[str]:
    import tvm

    kinds = []
    for kind in ("llvm", "cuda", "rocm", "vulkan", "metal", "opencl"):
        if tvm.get_global_func(f"target.build.{kind}", allow_missing=True) is not None:
            kinds.append(kind)
    return kinds


def _ccl_status() -> str:
    """Whether the NCCL backend for sharded models can be built here (runtime/ccl.py)."""
    from .errors import UserError
    from .runtime.ccl import _cuda_flags

    try:
        _, libs, _ = _cuda_flags()
    except UserError as e:
        return str(e).split(": ", 1)[-1]
    return "NCCL backend buildable (" + ", ".join(libs) + ")"


def run(args) -> int:
    import tvm
    import tvm_ffi

    from . import __version__
    from .database import default_db_path
    from .tuner.targets import ARCHES, host_arch, local_gpus

    gpus = local_gpus()
    rows = [
        ("shardtune", __version__),
        ("TVM", tvm.__version__),
        ("tvm-ffi", tvm_ffi.__version__),
        ("LLVM", str(tvm.target.codegen.llvm_version_major())),
        ("code generation", ", ".join(_buildable_targets())),
        ("arches", ", ".join(["cpu (" + host_arch().name + ")", *ARCHES])),
        ("GPUs", "; ".join(f"{g['index']}: {g['name']} ({g['arch']}, {g['compute_units']} CUs)"
                           for g in gpus) or "none"),
        ("multi-GPU", _ccl_status()),
        ("default database", str(default_db_path())),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
