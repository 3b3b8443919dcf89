"""`shardtune build`: a Llama from a checkpoint (or random weights of the real shapes),
with every template kernel scheduled by the tuning database's best record for
(arch, shards), into a folder the runtime loads without the checkpoint.

model dir/
  config.json        the model, quantization, arch, shards, parameters, prefill buckets, and where
                     each kernel came from
  model.so           the compiled decode step, a batched prefill step per bucket (prefill_<n>),
                     and the fill functions that make random weights
  params/shard-K.safetensors   one file per shard, unless the weights are random
  tokenizer.json     copied from the checkpoint, when it has one
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from ..errors import UserError
from ..models import load_config
from ..plan import DEFAULT_CAPACITY, PREFILL_BUCKETS, check_quant, prefill_buckets
from ..kernels import PASS_CONFIG
from .model import KERNEL_ATTR, Llama
from .pdl import pdl_pipeline
from .random_fill import add_fill_functions

FORMAT = "shardtune-model/1"


def _kernel_tag(func) -> dict | None:
    attrs = func.attrs
    if attrs is None or KERNEL_ATTR not in attrs:
        return None
    return json.loads(str(attrs[KERNEL_ATTR]))


def apply_database(mod, db, arch: str, shards: int, target, device: str | None = None) -> list[dict]:
    """Replace each template PrimFunc by its best record's schedule (the fastest measured on
    `device`, where a record was: see TuningDB.best_for). Without a record a GPU kernel gets TVM's
    dlight rules (GEMV, norms), or the template's default knobs where dlight has no real rule for
    it (attention, SiLU(gate)*up); a CPU one gets the default knobs. Returns what each got."""
    import tvm

    from ..kernels import get_template
    from ..kernels.template import target_is_gpu

    report = []
    for gv, func in list(mod.functions.items()):
        tag = _kernel_tag(func) if isinstance(func, tvm.tirx.PrimFunc) else None
        if tag is None:
            continue
        tpl = get_template(tag["template"])
        rec, tuned_at = (None, None) if db is None else db.best_for(tpl.name, tag["workload"], arch, shards, device)
        entry = {"function": gv.name_hint, "site": tag["site"], "template": tpl.name, "workload": tag["workload"]}
        if rec is not None:
            entry["measured_on"] = rec.device
        base_us = rec.extra.get("baseline_us") if rec is not None and rec.extra.get("baseline") == "dlight" else None
        if rec is not None and base_us is not None and base_us < rec.latency_us and target_is_gpu(target):
            # A short search can end above the dlight schedule it was measured against: keep dlight.
            sched = tpl.dlight_schedule(tag["workload"], target)
            entry.update(source="dlight", latency_us=base_us, note=f"faster than the record's {rec.latency_us:.2f} us")
        elif rec is not None:
            knobs = rec.knobs
            entry.update(source="database", knobs=knobs, latency_us=rec.latency_us)
            if tuned_at != shards:
                entry["tuned_at_shards"] = tuned_at
        else:
            sched = None
            if target_is_gpu(target) and tpl.untuned_uses_dlight(target):
                sched = tpl.dlight_schedule(tag["workload"], target, fallback=False)
                entry["source"] = "dlight"
            if sched is None:   # dlight cannot, or would only give one thread per output
                knobs = tpl.default_knobs(tag["workload"], target)
                entry.update(source="default knobs", knobs=knobs)
        if entry["source"] != "dlight":
            sched = tpl.schedule(tag["workload"], knobs, target)
        sched = sched["main"]
        attrs = {k: v for k, v in func.attrs.items()} if func.attrs else {}
        for key in ("global_symbol", KERNEL_ATTR, "op_pattern"):
            sched = sched.with_attr(key, attrs[key])
        mod[gv] = sched.with_attr("tirx.is_scheduled", True)
        report.append(entry)
    return report


def local_device_of(arch: str) -> str | None:
    """The name of the local GPU when it is of `arch` (a build made where it will run)."""
    from ..tuner.targets import local_gpus

    if arch == "cpu":
        return None
    return next((g["name"] for g in local_gpus() if g["arch"] == arch), None)


def _open_db(db_path: str | None, arch: str, shards: int, log):
    from ..database.reference import open_any, open_for_build

    if not db_path:   # the user's default database, else the shipped reference (it says so)
        return open_for_build(arch, shards, log)
    path = Path(db_path)
    if not path.exists():
        raise UserError(f"tuning database {path} does not exist")
    return open_any(path), str(path)   # a database file or a JSON Lines export (read-only)


def build(out_dir: str, model: str | None = None, weights: str | None = None, random_weights: bool = False,
          quant: str = "q4f16_1", arch: str = "cpu", shards: int = 1, db: str | None = None,
          capacity: int = DEFAULT_CAPACITY, prefill=PREFILL_BUCKETS, allreduce: str = "auto",
          device: str | None = "auto", pdl: str = "auto", log=sys.stderr) -> dict:
    """Build a model folder; returns its config. `weights` is a Hugging Face checkpoint folder;
    `model` with `random_weights` builds random weights of that model's real shapes. `prefill`:
    the prompt lengths to compile a batched prefill step for (each capped at the capacity; empty:
    none, the prompt goes token by token through the decode step). `device`: prefer records
    measured on this GPU model ("auto": the local GPU, where it is of `arch`; None: the fastest
    record of any). `pdl`: programmatic dependent launch of the step's kernels (compiler/pdl.py);
    "auto": on for NVIDIA sm_90 and newer."""
    import tvm
    from tvm import relax

    from ..tuner.targets import get_arch, target_of
    from . import weights as W

    check_quant(quant)
    if (weights is None) == (not random_weights):
        raise UserError("give either --weights HF_DIR or --model NAME --random-weights")
    if weights is not None:
        cfg = load_config(str(Path(weights) / "config.json") if Path(weights).is_dir() else weights)
    else:
        if not model:
            raise UserError("--random-weights needs --model NAME (or a config.json path)")
        cfg = load_config(model)
    a = get_arch(arch)
    if allreduce not in ("auto", "nccl", "fused"):
        raise UserError(f"--allreduce is auto, nccl or fused, got {allreduce!r}")
    if allreduce == "auto":   # fused where it can run (it falls back to NCCL without peer access)
        allreduce = "fused" if shards > 1 and a.vendor == "nvidia" else "nccl"
    if allreduce == "fused" and (shards == 1 or a.vendor != "nvidia"):
        raise UserError("--allreduce fused needs --shards 2 or more on an NVIDIA arch (its barrier is CUDA atomics)")
    if pdl not in ("auto", "on", "off"):
        raise UserError(f"--pdl is auto, on or off, got {pdl!r}")
    pdl_ok = a.vendor == "nvidia" and int(a.name.removeprefix("sm_")) >= 90
    if pdl == "on" and not pdl_ok:
        raise UserError(f"--pdl on needs an NVIDIA arch of sm_90 or newer, not {a.name}")
    use_pdl = pdl_ok and pdl != "off"
    if quant == "q0f32" and a.vendor != "cpu":
        raise UserError("q0f32 is for exact checks on CPUs: use q0f16 or q4f16_1 on GPUs")
    if capacity > cfg.max_position_embeddings:
        capacity = cfg.max_position_embeddings
    target = target_of(a)
    spec = W.param_specs(cfg, quant, shards)   # checks the shard count too
    out = Path(out_dir)
    start = time.monotonic()

    buckets = prefill_buckets(capacity, prefill)
    store, db_path = _open_db(db, a.name, shards, log)   # before the export: a bad --db fails at once
    if device == "auto":
        device = local_device_of(a.name)
    try:
        llama = Llama(cfg, quant, shards, capacity, prefill=buckets, allreduce=allreduce, vendor=a.vendor)
        mod, named = llama.export()
        order = [name for name, _ in named]
        if set(order) != set(spec):
            raise AssertionError(f"model parameters and weight specs disagree: {sorted(set(order) ^ set(spec))}")
        kernels = apply_database(mod, store, a.name, shards, target, device)
    finally:
        if store is not None:
            store.close()
    add_fill_functions(mod, target)
    # matmul(x, W^T) as one NT matmul kernel (prefill, and q0f32's decode), not a transpose of W first
    mod = relax.transform.FuseTransposeMatmul()(mod)
    config = {"use_cuda_graph": a.vendor == "nvidia", "pdl": use_pdl}
    pass_config = {**PASS_CONFIG, "relax.backend.use_cuda_graph": config["use_cuda_graph"]}
    with target, tvm.transform.PassContext(opt_level=3, config=pass_config):
        ex = tvm.compile(mod, target=target, tir_pipeline=pdl_pipeline() if use_pdl else "default")
    if config["use_cuda_graph"]:   # how many graphs each step runs: decode and each prefill_<n> one
        steps = ["decode", *(["decode_nccl"] if llama.fused_allreduce else []), *(f"prefill_{n}" for n in buckets)]
        config["cuda_graphs"] = cuda_graphs(ex.as_text(), steps)

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    ex.export_library(str(tmp / "model.so"))
    if weights is not None:
        save_params(weights, cfg, quant, shards, tmp / "params", log)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (Path(weights) / name).is_file():
                shutil.copy(Path(weights) / name, tmp / name)
    conf = {
        "format": FORMAT, "model": cfg.to_dict(), "quant": quant, "arch": a.name, "target": a.target,
        "shards": shards, "allreduce": allreduce if shards > 1 else None, "capacity": capacity,
        "device_greedy": True,   # decode writes the greedy token and position (older builds' does not)
        # the LM head split and its logits gathered: every rank picks the same greedy token
        "lm_head_split": llama.head_gathered,
        "prefill_buckets": buckets, "random_weights": weights is None,
        "params": [[name, list(spec[name][0]), spec[name][1]] for name in order],
        "cache": {"shape": list(llama.cache_shape()), "dtype": "float32" if quant == "q0f32" else "float16",
                  "count": 2 * cfg.num_hidden_layers},
        "kernels": kernels, "database": db_path, "records_preferred_from": device, **config,
        "eos_token_id": _eos(weights),
        "built_with": {"tvm": tvm.__version__, "seconds": round(time.monotonic() - start, 1)},
    }
    (tmp / "config.json").write_text(json.dumps(conf, indent=1))
    if out.exists():   # replace only a finished build, never half of one
        if not (out / "config.json").is_file():
            shutil.rmtree(tmp)
            raise UserError(f"{out} exists and is not a shardtune model folder: choose another -o")
        shutil.rmtree(out)
    tmp.rename(out)
    _print_kernel_report(kernels, db_path, device, log)
    return conf


def cuda_graphs(vm_text: str, functions: list[str]) -> dict[str, int]:
    """function -> the CUDA graphs it launches (vm.builtin.cuda_graph.run_or_capture calls), read
    from the VM executable's text (`@name:` starts a function's instructions)."""
    counts, current = {name: 0 for name in functions}, None
    for line in vm_text.splitlines():
        if line.startswith("@"):
            current = line[1:-1] if line.endswith(":") else None
        elif current in counts and "vm.builtin.cuda_graph.run_or_capture" in line:
            counts[current] += 1
    return counts


def _eos(weights: str | None):
    """The checkpoint's end-of-sequence id(s): generation stops there."""
    for name in ("generation_config.json", "config.json"):
        f = Path(weights or "") / name
        if weights and f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                return eos
    return None


PARAM_FILE_BYTES = 2 << 30   # split each shard's parameters into files of about this size


def save_params(checkpoint: str, cfg, quant: str, shards: int, folder: Path, log) -> None:
    """params/shard-K-NNNNN.safetensors: each shard's converted parameters, in files of ~2 GB."""
    from safetensors.numpy import save_file
    from tqdm import tqdm

    from .weights import convert, param_specs

    folder.mkdir()
    n_params = len(param_specs(cfg, quant, shards))
    for shard in range(shards):
        chunk, size, part = {}, 0, 0
        for name, arr in tqdm(convert(checkpoint, cfg, quant, shards, shard), total=n_params, file=log,
                              desc=f"weights shard {shard}", disable=n_params < 50, leave=False):
            chunk[name], size = arr, size + arr.nbytes
            if size >= PARAM_FILE_BYTES:
                save_file(chunk, str(folder / f"shard-{shard}-{part:05d}.safetensors"))
                chunk, size, part = {}, 0, part + 1
        if chunk:
            save_file(chunk, str(folder / f"shard-{shard}-{part:05d}.safetensors"))


def _print_kernel_report(kernels: list[dict], db_path: str | None, device: str | None, log) -> None:
    tuned = [k for k in kernels if k["source"] == "database"]
    beaten = [k for k in kernels if "note" in k]
    others = [k for k in kernels if k["source"] != "database" and "note" not in k]
    elsewhere = sorted({k["measured_on"] for k in tuned if k["measured_on"] != device}) if device else []
    print(f"kernels: {len(tuned)} from {db_path or 'no tuning database'}, {len(others)} without a record"
          + (f", {len(beaten)} where dlight beat the record" if beaten else ""), file=log)
    if device:
        print(f"  records measured on {device} first; "
              + (f"{sum(k['measured_on'] != device for k in tuned)} from other GPUs ({', '.join(elsewhere)})"
                 if elsewhere else "all from it"), file=log)
    for k in beaten + others:
        shape = ",".join(f"{key}={v}" for key, v in k["workload"].items())
        print(f"  {k['site']:<10} {k['template']:<24} {shape}: {k['source']}"
              + (f" ({k['note']})" if "note" in k else ""), file=log)
