"""Where ptxas puts a GEMV's global loads, without a GPU: build a template with given knobs for sm_90,
compile TVM's CUDA with nvcc to a cubin, disassemble it (nvdisasm, from the PyPI wheel
`nvidia-cuda-nvdisasm`) and count the loads of each width issued before the first use of a loaded value
by the math, and in all. Session 17 found that ptxas issues only 4 of a thread's 7 weight loads, and
none of its scale loads, before the first dot product of the tuned 8192x7168 GEMV (NOTES.md).

    python3 benchmarks/gemv_sass.py q4f16_1_gemv 8192 7168 [--edit hoist] \
        '{"rows": 8, "tx": 64, "vec": 2, "unroll": 4, "x_scope": "shared", "decode": "f16x2", "k_loop": "unrolled"}'
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tvm

from shardtune.kernels import get_template
from shardtune.tuner.measure import generated_source
from shardtune.tuner.targets import get_arch, target_of


def nvdisasm() -> str:
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia.cu13   # the nvidia-cuda-nvdisasm wheel puts it here
    except ImportError:
        sys.exit("nvdisasm not found: pip install nvidia-cuda-nvdisasm")
    return str(Path(nvidia.cu13.__path__[0]) / "bin" / "nvdisasm")


def sass(template: str, N: int, K: int, knobs: dict, edit: str | None = None) -> tuple[str, int | None, int]:
    """The cubin's disassembly, its registers per thread and bytes of spill stores; `edit`: a variant of
    gemv_source_probe.py applied to TVM's source first."""
    target = target_of(get_arch("sm_90"))
    wl = {"batch": 1, "N": N, "K": K, "quant": "q4f16_1"}
    tpl = get_template(template)
    if why := tpl.check(wl, knobs, target):
        sys.exit(f"{template} {N}x{K}: {why}")
    with target:
        src = generated_source(tvm.compile(tpl.schedule(wl, knobs, target), target=target))
    if edit:
        from gemv_source_probe import variants   # beside this script

        edits = variants(src, knobs["rows"], K, tpl.epilogue == "silu_mul", tpl.outputs(wl) // knobs["rows"])
        src = edits.get(edit) or sys.exit(f"{edit}: not for this kernel (these are: {', '.join(edits)})")
    with tempfile.TemporaryDirectory() as tmp:
        cu, cubin = Path(tmp, "k.cu"), Path(tmp, "k.cubin")
        cu.write_text(src)
        built = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-O3", "-w", "-Xptxas", "-v", "-o", cubin, cu],
                               capture_output=True, text=True)
        if built.returncode:
            sys.exit(f"nvcc failed:\n{built.stderr[-2000:]}")
        regs = built.stderr   # ptxas -v: registers and spills
        out = subprocess.run([nvdisasm(), "-c", cubin], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Used (\d+) registers", regs)
    spills = re.search(r"(\d+) bytes spill stores", regs)
    return out, int(m.group(1)) if m else None, int(spills.group(1)) if spills else 0


def summary(code: str) -> dict:
    """Instructions (NOPs and branches not counted), global loads by width in bytes in issue order, and
    how many precede the first arithmetic that reads a loaded register (where a warp first waits on
    memory)."""
    loads, loaded, first_wait, count = [], set(), None, 0
    for line in code.splitlines():
        ins = re.search(r"/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)\s+([^;]*);", line)
        if not ins:
            continue
        count += ins.group(2) not in ("NOP", "BRA")
        op, args = ins.group(2), [a.strip() for a in ins.group(3).split(",")]
        if op.startswith("LDG"):
            parts = op.split(".")
            loads.append({"128": 16, "64": 8, "U16": 2, "U8": 1}.get(parts[2] if len(parts) > 2 else "", 4))
            loaded.add(args[0])
        else:
            if first_wait is None and (op.startswith(("HFMA2", "HADD2", "HMUL2", "FFMA", "FADD", "FMUL", "PRMT", "LOP3", "I2F"))
                                       and any(re.sub(r"\.H[01].*|\.reuse", "", a) in loaded for a in args[1:])):
                first_wait = len(loads)
            if not op.startswith("ST"):
                loaded.discard(args[0])   # overwritten: no longer a loaded value
    return {"instructions": count, "load_bytes": {b: loads.count(b) for b in sorted(set(loads), reverse=True)},
            "issued_before_first_use": first_wait, "order_bytes": " ".join(map(str, loads))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("template")
    ap.add_argument("N", type=int)
    ap.add_argument("K", type=int)
    ap.add_argument("knobs", help="JSON")
    ap.add_argument("--edit", help="a variant of gemv_source_probe.py (hoist, l2pf, ...)")
    ap.add_argument("--sass", help="write the disassembly here")
    a = ap.parse_args()
    code, regs, spills = sass(a.template, a.N, a.K, json.loads(a.knobs), a.edit)
    if a.sass:
        Path(a.sass).write_text(code)
    print(json.dumps({"template": a.template, "N": a.N, "K": a.K, "knobs": json.loads(a.knobs), "edit": a.edit,
                      "registers": regs, "spill_bytes": spills, **summary(code)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
