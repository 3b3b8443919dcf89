"""Programmatic dependent launch (PDL, sm_90 and newer) for the model's kernels.

In a CUDA graph a kernel normally starts after the one before it has finished; its blocks are
then launched and scheduled while memory sits idle, at each of the ~300 kernel boundaries of a
decode step. A kernel launched with PDL may be launched before the one before it ends; it stops
at `griddepcontrol.wait` until that kernel has finished and its writes are visible.

This pass puts the wait first in every kernel TVM compiles for the model (templates, dlight's and
TVM's own), so nothing is read or written before the kernel before it is done and the step's
order is unchanged, and marks those kernels for PDL launch (TVM's launch tag, spelt
`use_programtic_...` in TVM). Kernels TVM did not compile (NCCL's, copies) launch as before. It
runs on the lowered module: the templates' source, and the records tuned from it, stay as they
are, and the tuner times kernels without it.

Measured on one H100, Llama-2-7B q4f16_1 (benchmarks/results/2026-11-27-pdl/): step 1994 -> 1946
us, 486-495 -> 499-501 tok/s. Also calling `griddepcontrol.launch_dependents` at each kernel's
start, so that the next kernel's blocks are launched while this one runs, made it slower (473-476
tok/s), for a reason not looked into (perhaps the waiting blocks crowd the running kernel's)."""
from __future__ import annotations

import tvm

from ..kernels.cuda_helpers import register_cuda_helper

PDL_TAG = "tirx.use_programtic_dependent_launch"   # TVM's spelling
DYN_SMEM_TAG = "tirx.use_dyn_shared_memory"        # TVM wants this tag last
PDL_CUDA = """
__device__ __forceinline__ void st_pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
"""
register_cuda_helper("st_pdl_wait", PDL_CUDA)


def _with_pdl(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    tags = [str(t) for t in func.attrs["tirx.kernel_launch_params"]]
    if PDL_TAG in tags:
        return func
    at = tags.index(DYN_SMEM_TAG) if DYN_SMEM_TAG in tags else len(tags)
    tags.insert(at, PDL_TAG)
    wait = tvm.tirx.Evaluate(tvm.tirx.call_extern("void", "st_pdl_wait"))
    return func.with_body(tvm.tirx.SeqStmt([wait, func.body])).with_attr("tirx.kernel_launch_params", tags)


def pdl_pass() -> tvm.transform.Pass:
    """Give PDL to every device kernel of the module (those SplitHostDevice made)."""

    @tvm.transform.module_pass(opt_level=0, name="shardtune.PDL")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions.items():
            if (isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None
                    and "tirx.kernel_launch_params" in func.attrs):
                updates[gv] = _with_pdl(func)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def pdl_pipeline() -> str:
    """The name of a TIR pipeline (registered here): TVM's default, then the PDL pass."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline
    from tvm.tirx import register_tir_pipeline

    def factory():
        main, finalize_host, finalize_device = default_s_tir_pipeline()
        return tvm.transform.Sequential([main, pdl_pass()]), finalize_host, finalize_device

    name = "shardtune_pdl"
    register_tir_pipeline(name, factory)
    return name
