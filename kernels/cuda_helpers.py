"""CUDA device functions that templates call by name (T.call_extern), defined in the generated code.

TVM hands the generated CUDA C to `tvm_callback_cuda_postproc` before compiling it. q4_gemv.py
installs that hook for its own helper; this module wraps it, putting in the definition of every
helper registered here that the code calls."""
from __future__ import annotations

import tvm

from . import q4_gemv  # noqa: F401 - its hook first, so that ours wraps it whatever the import order

_helpers: dict[str, str] = {}   # function name -> the CUDA source that defines it
_previous = tvm.get_global_func("tvm_callback_cuda_postproc", allow_missing=True)


def register_cuda_helper(name: str, source: str) -> None:
    _helpers[name] = source


@tvm.register_global_func("tvm_callback_cuda_postproc", override=True)
def _add_cuda_helpers(code, target=None):
    if _previous is not None:
        code = _previous(code, target)
    at = code.find('extern "C" __global__')
    needed = []
    for name, source in _helpers.items():
        if f"{name}(" in code and source not in needed and source not in code:
            needed.append(source)
    return code[:at] + "".join(needed) + code[at:] if needed and at >= 0 else code
