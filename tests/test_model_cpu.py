"""The model compiler and runtime on the CPU, against a real (tiny) Hugging Face Llama:
q0f32 greedy ids and logits against transformers, q4f16_1 against transformers run on
the dequantized weights, batched prefill against token-by-token decode, and the
build/generate/bench commands with their bad inputs."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tvm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from shardtune import build, load  # noqa: E402
from shardtune.errors import UserError  # noqa: E402
from shardtune.compiler.weights import quantize_q4  # noqa: E402
from shardtune.kernels.q4_gemv import dequantize  # noqa: E402

PROMPT = [1, 5, 17, 42, 7]            # 5 tokens: padded to the prefill bucket 8
LONG = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]   # 13 > 8: a chunk of 8, then 5 padded to 8
BUCKETS = (4, 8)                      # the CPU models' prefill steps (small: prompts past the largest fit)
WORDS = [f"w{i}" for i in range(100)]


def _save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers (safetensors), with grouped-query attention."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=100,
                                   rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
                                   rope_theta=10000.0, eos_token_id=None, bos_token_id=1)
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(folder)
    return folder


def hf_greedy(model, n: int):
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences[0, len(PROMPT):].tolist(), torch.stack(out.logits)[:, 0].float().numpy()


def agree_until_near_tie(ours: list[int], ref_ids: list[int], ref_logits: np.ndarray, margin: float) -> int:
    """How many ids match, stopping without blame at the first step whose top-2 reference
    logits are closer than `margin` (there either answer is right)."""
    for i, (a, b) in enumerate(zip(ours, ref_ids)):
        top2 = np.sort(ref_logits[i])[-2:]
        if top2[1] - top2[0] < margin:
            return len(ref_ids)
        if a != b:
            return i
    return len(ref_ids)


@pytest.fixture(scope="module")
def built(hf_dir, tmp_path_factory):
    out = {}
    for quant in ("q0f32", "q4f16_1", "q0f16"):
        path = tmp_path_factory.mktemp("models") / quant
        build(str(path), weights=str(hf_dir), quant=quant, arch="cpu", capacity=64, db=None, prefill=BUCKETS)
        out[quant] = path
    return out


def test_q0f32_matches_transformers(hf_dir, built):
    ref_ids, ref_logits = hf_greedy(transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval(), 24)
    ids, logits = load(str(built["q0f32"])).generate(PROMPT, max_new_tokens=24, return_logits=True)
    assert agree_until_near_tie(ids, ref_ids, ref_logits, 1e-4) == len(ref_ids), (ids, ref_ids)
    assert np.abs(logits - ref_logits).max() < 1e-4 * max(1.0, np.abs(ref_logits).max())


def test_q4f16_1_matches_dequantized_reference(hf_dir, built):
    """transformers in fp32 on the dequantized q4 weights is what our q4f16_1 kernels compute
    (up to fp16 activations)."""
    ref = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("proj.weight") or name == "lm_head.weight":
                p.copy_(torch.from_numpy(dequantize(*quantize_q4(p.numpy()))))
    ref_ids, ref_logits = hf_greedy(ref, 16)
    ids, logits = load(str(built["q4f16_1"])).generate(PROMPT, max_new_tokens=16, return_logits=True)
    scale = np.abs(ref_logits).max()
    assert np.abs(logits - ref_logits).max() < 1e-2 * scale
    assert agree_until_near_tie(ids, ref_ids, ref_logits, 2e-2 * scale) == len(ref_ids), (ids, ref_ids)
    # and it is not the unquantized model: quantization must show
    _, fp_logits = hf_greedy(transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval(), 16)
    assert np.abs(logits[0] - fp_logits[0]).max() > np.abs(logits[0] - ref_logits[0]).max()


@pytest.mark.parametrize("quant", ["q0f32", "q4f16_1", "q0f16"])
def test_greedy_on_the_device_picks_the_hosts_ids(built, quant):
    """The argmax and position advance in the compiled step against the same step with the
    logits copied out and argmax taken by NumPy: the same kernels, so the very same ids."""
    model = load(str(built[quant]))
    assert model.device_greedy
    for prompt in (PROMPT, LONG):
        on_device = model.generate(prompt, max_new_tokens=30)
        on_host, _ = model.generate(prompt, max_new_tokens=30, return_logits=True)
        assert on_device == on_host and len(set(on_device)) > 1, (on_device, on_host)
    # read in batches of 8 (generate, bench): 11 tokens end inside the second batch; an end-of-
    # sequence token inside a batch ends the run there, the tokens picked after it dropped
    assert model.generate(LONG, max_new_tokens=11) == on_device[:11]
    assert model.generate(LONG, max_new_tokens=11, read_every=3) == model.generate(LONG, max_new_tokens=11, read_every=1)
    assert model.generate(LONG, max_new_tokens=11, read_every=1) == on_device[:11]
    model.conf["eos_token_id"] = on_device[5]
    streamed = []
    stopped = model.generate(LONG, max_new_tokens=30, on_token=streamed.append)
    del model.conf["eos_token_id"]
    assert stopped == streamed == on_device[:on_device.index(on_device[5]) + 1]
    # steps launched without reading their tokens (decode_profile.py): the same run, read at the end
    first = int(np.argmax(model.prefill(LONG)))
    model.greedy_step(first, len(LONG), read=False)
    for _ in range(4):
        model.greedy_step(read=False)
    assert int(model.token.numpy()[0]) == on_device[5] and int(model.pos.numpy()[0]) == len(LONG) + 5


def test_q0f16_close_to_transformers(hf_dir, built):
    _, ref_logits = hf_greedy(transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval(), 8)
    _, logits = load(str(built["q0f16"])).generate(PROMPT, max_new_tokens=8, return_logits=True)
    assert np.abs(logits - ref_logits).max() < 1e-2 * np.abs(ref_logits).max()


def test_model_folder(built):
    conf = json.loads((built["q4f16_1"] / "config.json").read_text())
    assert conf["quant"] == "q4f16_1" and conf["shards"] == 1 and not conf["random_weights"]
    assert (built["q4f16_1"] / "tokenizer.json").is_file()
    sources = {k["site"]: k["source"] for k in conf["kernels"]}
    assert {"qkv", "o", "gate_up", "down", "lm_head", "rope", "attention"} <= set(sources)
    names = [p[0] for p in conf["params"]]
    assert "layers.0.qkv.qweight" in names and "lm_head.qweight" in names


def shardtune(*args, **kw):
    return subprocess.run([sys.executable, "-m", "shardtune", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kw)


def test_cli_generate_and_bench(built, tmp_path):
    model = built["q0f32"]
    r = shardtune("generate", model, "--prompt", "w1 w5 w17", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 5 and all(w in WORDS for w in r.stdout.split())
    r = shardtune("generate", model, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6", "--print-ids")
    assert r.returncode == 0, r.stderr
    assert [int(x) for x in r.stdout.split()] == load(str(model)).generate(PROMPT, max_new_tokens=6)
    r = shardtune("generate", model, "--prompt-ids", "1,2", "--temperature", "0.8", "--top-p", "0.9",
                  "--max-new-tokens", "4", "--print-ids", "--seed", "3")
    assert r.returncode == 0 and len(r.stdout.split()) == 4
    out = tmp_path / "bench.json"
    r = shardtune("bench", model, "--gen-len", "8", "--repeat", "2", "--json", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["decode_tok_s"] > 0 and len(res["decode_tok_s_runs"]) == 2 and res["copy_gbps"] > 0
    assert res["prefill"] == "batched" and res["prefill_buckets"] == list(BUCKETS) and res["prefill_ms"] > 0
    assert 0 < res["roofline_fraction"] and res["weight_bytes_per_token"] > 0
    assert res["greedy"] == "argmax on the device, tokens read 8 at a time"
    assert res["pdl"] is False   # a CPU build: no programmatic dependent launch
    r = shardtune("bench", model, "--gen-len", "5", "--repeat", "1", "--read-every", "1", "--json", out)
    assert r.returncode == 0 and json.loads(out.read_text())["greedy"].endswith("tokens read 1 at a time"), r.stderr
    r = shardtune("bench", model, "--gen-len", "5", "--read-every", "0")
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].endswith("--read-every must be positive, got 0")


def test_random_weights_build_is_deterministic(tmp_path):
    out = tmp_path / "rand"
    r = shardtune("build", "--model", "tiny", "--random-weights", "--quant", "q4f16_1", "--arch", "cpu",
                  "--capacity", "32", "-o", out)
    assert r.returncode == 0, r.stderr
    assert not (out / "params").exists()       # nothing but the library and config
    a = load(str(out), seed=1).generate([1, 2, 3], max_new_tokens=5)
    b = load(str(out), seed=1).generate([1, 2, 3], max_new_tokens=5)
    assert a == b and len(a) == 5


@pytest.mark.parametrize("args, message", [
    (["build", "--model", "llama2-70b", "--random-weights", "--shards", "3", "-o", "{tmp}/x"], "do not divide"),
    (["build", "--model", "tiny", "--random-weights", "--arch", "sm_90", "--quant", "q0f32", "-o", "{tmp}/x"], "q0f32"),
    (["build", "--model", "tiny", "-o", "{tmp}/x"], "--random-weights"),
    (["build", "--model", "tiny", "--random-weights", "--arch", "sm_99", "-o", "{tmp}/x"], "unknown arch"),
    (["build", "--model", "tiny", "--random-weights", "--arch", "sm_80", "--pdl", "on", "-o", "{tmp}/x"], "sm_90"),
    (["build", "--weights", "{tmp}", "-o", "{tmp}/x"], "config"),
    (["generate", "{tmp}", "--prompt-ids", "1"], "not a shardtune model folder"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capfd):
    # In this process (a subprocess spends 4 s importing TVM); the CLI tests above run the real one.
    from shardtune.cli import main

    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capfd.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err


def test_build_reads_a_jsonl_database_and_refuses_a_corrupt_one_at_once(tmp_path):
    from shardtune.database.reference import REFERENCE_DIR

    ref = str(REFERENCE_DIR / "sm_90.jsonl")   # an export serves as --db as it is (read-only)
    conf = build(str(tmp_path / "j"), model="tiny", random_weights=True, arch="sm_90", capacity=64,
                     prefill=(), db=ref)
    assert conf["database"] == ref
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database" * 100)
    # before the 70B program is made (minutes on a small machine), and the file left as it was
    r = subprocess.run([sys.executable, "-m", "shardtune", "build", "--model", "llama2-70b", "--random-weights",
                        "--arch", "sm_90", "--db", str(bad), "-o", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a SQLite database" in r.stderr and r.stderr.strip().count("\n") == 0
    assert bad.read_bytes() == b"not a database" * 100 and not (tmp_path / "x").exists()


def test_wrong_checkpoint_and_existing_folder(hf_dir, built, tmp_path):
    # a checkpoint of another size: its config disagrees with its tensors
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    conf = json.loads((bad / "config.json").read_text())
    conf["hidden_size"] = 128
    (bad / "config.json").write_text(json.dumps(conf))
    r = shardtune("build", "--weights", bad, "--quant", "q0f32", "-o", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "out").exists()
    # an existing folder that is not a model is never replaced
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    r = shardtune("build", "--model", "tiny", "--random-weights", "--capacity", "16", "-o", keep)
    assert r.returncode == 2 and (keep / "precious.txt").read_text() == "x"
    # prompt text needs a tokenizer
    r = shardtune("generate", built["q0f32"], "--prompt-ids", "1,500")
    assert r.returncode == 2 and "outside the vocabulary" in r.stderr


# --- batched prefill ------------------------------------------------------------------------

def _token_by_token(model, prompt, follow):
    """The logits after the prompt fed one token at a time through decode, then after each of
    `follow` (decode steps at the next positions)."""
    out = [[model.step(t, i) for i, t in enumerate(prompt)][-1]]
    return out + [model.step(t, len(prompt) + i) for i, t in enumerate(follow)]


@pytest.mark.parametrize("quant, tol", [("q0f32", 1e-5), ("q0f16", 5e-3), ("q4f16_1", 5e-3)])
def test_prefill_then_decode_matches_token_by_token(built, quant, tol):
    """A prompt shorter than a bucket (padded) and one longer than the largest (chunked): the
    logits after the prompt and after three decode steps that follow it (which overwrite the
    padding's cache rows before reading them) agree with feeding the prompt through decode."""
    m = load(str(built[quant]))
    assert m.prefill_buckets == BUCKETS
    follow = [11, 2, 60]
    for prompt in (PROMPT, LONG):
        ref = _token_by_token(m, prompt, follow)
        got = [m.prefill(prompt)] + [m.step(t, len(prompt) + i) for i, t in enumerate(follow)]
        scale = np.abs(ref[0]).max()
        for i, (a, b) in enumerate(zip(got, ref)):
            assert np.abs(a - b).max() < tol * scale, (quant, len(prompt), i, np.abs(a - b).max() / scale)
    # a chunk that starts mid-cache (pos > 0), as generation after a long prompt does
    logits = m.run_prefill(LONG[8:], 8).numpy()
    assert logits.shape == (1, 100) and np.abs(logits[0] - ref[0]).max() < tol * scale
    with pytest.raises(UserError, match="1..8 tokens"):
        m.run_prefill(LONG[:9], 0)


def test_prefill_q0f32_matches_transformers(hf_dir, built):
    """The chunked prompt's logits against transformers' forward pass over the whole prompt."""
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ref = model(torch.tensor([LONG])).logits[0, -1].float().numpy()
    logits = load(str(built["q0f32"])).prefill(LONG)
    assert np.abs(logits - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_build_without_prefill_steps_runs_token_by_token(built, tmp_path):
    """A model folder from before prefill (no "prefill_buckets" in its config) generates as before."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(built["q0f32"], old)
    conf = json.loads((old / "config.json").read_text())
    del conf["prefill_buckets"]
    (old / "config.json").write_text(json.dumps(conf))
    m = load(str(old))
    assert m.prefill_buckets == ()
    assert m.generate(LONG, max_new_tokens=4) == load(str(built["q0f32"])).generate(LONG, max_new_tokens=4)
    assert m.bench(prompt_len=3, gen_len=2, repeat=1)["prefill"] == "token by token through the decode step"


def test_prefill_kernels_compile_for_sm90_inside_the_model(tmp_path, monkeypatch):
    """A GPU build without a GPU: the prefill steps' kernels (templates, the q4 GEMMs) in
    the model's CUDA C, built by nvcc for sm_90 where it is installed; a 2-shard build lowers the
    prefill all-reduces; decode and each prefill step stay one CUDA graph; running it here is one
    clear line."""
    import re
    import shutil

    from shardtune.tuner.targets import get_arch, target_of

    built_ex = []
    compile_ = tvm.compile
    monkeypatch.setattr(tvm, "compile", lambda *a, **k: built_ex.append(compile_(*a, **k)) or built_ex[-1])
    conf = build(str(tmp_path / "q4"), model="tiny", random_weights=True, quant="q4f16_1", arch="sm_90",
                 capacity=64, db=None)
    assert conf["prefill_buckets"] == [16, 64]   # the default buckets (16, 64, 256), capped at the capacity
    assert conf["use_cuda_graph"] and conf["cuda_graphs"] == {"decode": 1, "prefill_16": 1, "prefill_64": 1}
    assert {k["source"] for k in conf["kernels"]} <= {"dlight", "default knobs", "database"}
    src = built_ex[-1].mod.imports[0].imports[0].inspect_source()
    kernels = set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", src))
    assert "greedy_next_kernel" in kernels
    for n in (16, 64):
        assert {f"embedding_embedding_n{n}_kernel", f"prefill_rope_kv_append_rope_n{n}_kernel",
                f"prefill_attention_attention_n{n}_kernel"} <= kernels, sorted(kernels)
        # the linear layers on tensor cores, dequantized on the way (no fp16 weights in memory)
        assert {f"q4f16_1_gemm_{site}_n{n}_kernel" for site in ("qkv", "o", "gate_up", "down")} <= kernels
    assert not any("dequantize" in k or "matmul" in k.lower() for k in kernels), sorted(kernels)
    assert src.count("wmma::mma_sync") >= 8
    # programmatic dependent launch (compiler/pdl.py): every kernel waits for the one before it
    # first thing, and the module launches them with PDL
    assert conf["pdl"] is True
    starts = re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\([^)]*\) \{\n\s*(\w+)\(\);", src)
    assert {k for k, first in starts if first == "st_pdl_wait"} == kernels, sorted(kernels - {k for k, _ in starts})
    assert b"tirx.use_programtic_dependent_launch" in (tmp_path / "q4" / "model.so").read_bytes()
    if shutil.which("nvcc"):
        with target_of(get_arch("sm_90")):
            assert len(tvm.support.nvcc.compile_cuda(src, target_format="cubin", compiler="nvcc")) > 10_000
    r = shardtune("generate", tmp_path / "q4", "--prompt-ids", "1,2")
    if r.returncode != 0:    # no GPU here
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    conf = build(str(tmp_path / "tp2"), model="tiny", random_weights=True, quant="q0f16", arch="sm_90", shards=2,
                 capacity=64, db=None, prefill=(16,), allreduce="nccl")
    assert conf["cuda_graphs"] == {"decode": 1, "prefill_16": 1}
    # the row-parallel o and down layers' partial sums: one all-reduce each per layer, in the graph
    graph = built_ex[-1].as_text().split("@prefill_16_cuda_graph_capture:\n")[1].split("\n@")[0]
    assert graph.count("call  runtime.disco.allreduce") == 2 * 2


@pytest.mark.parametrize("baseline_us,source", [(8.0, "dlight"), (12.0, "database")])
def test_build_keeps_dlight_where_it_beat_the_record(tmp_path, baseline_us, source):
    """A short search can store a record slower than the dlight schedule it was measured against:
    the build then takes dlight and says why."""
    import json as _json

    from shardtune.compiler.build import apply_database
    from shardtune.compiler.model import KERNEL_ATTR
    from shardtune.database import Record, TuningDB
    from shardtune.database.checks import installed_tvm_version
    from shardtune.kernels import get_template
    from shardtune.tuner.targets import get_arch, target_of

    tpl, wl = get_template("q4f16_1_gemv"), {"batch": 1, "N": 256, "K": 512, "quant": "q4f16_1"}
    target = target_of(get_arch("sm_90"))
    tag = _json.dumps({"template": tpl.name, "workload": wl, "site": "qkv"}, sort_keys=True)
    func = tpl.compute(wl).with_attr(KERNEL_ATTR, tag).with_attr("op_pattern", 8).with_attr("global_symbol", "k")
    db = TuningDB(tmp_path / "t.db")
    db.add(Record(template=tpl.name, template_hash=tpl.source_hash, workload=wl, arch="sm_90", shards=1,
                  device="NVIDIA H100 80GB HBM3", compute_units=132, knobs=tpl.default_knobs(wl, target),
                  latency_us=10.0, latency_spread_us=0.1, runs=10, bandwidth_gbps=10.0, max_rel_error=1e-4,
                  tvm_version=installed_tvm_version(), extra={"baseline_us": baseline_us, "baseline": "dlight"}))
    (entry,) = apply_database(tvm.IRModule({"k": func}), db, "sm_90", 1, target)
    assert entry["source"] == source and entry["latency_us"] == min(baseline_us, 10.0)


def test_build_prefers_records_of_its_own_gpu(tmp_path):
    """H100 and H200 are both sm_90: a build for an H100 takes the H100's record, though the H200's
    is faster (its memory is); with no device named, the fastest."""
    import json as _json

    from shardtune.compiler.build import apply_database
    from shardtune.compiler.model import KERNEL_ATTR
    from shardtune.database import Record, TuningDB
    from shardtune.database.checks import installed_tvm_version
    from shardtune.kernels import get_template
    from shardtune.tuner.targets import get_arch, target_of

    # K wide enough that every tx below is a setting the template accepts (records it refuses are skipped)
    tpl, wl = get_template("q4f16_1_gemv"), {"batch": 1, "N": 256, "K": 8192, "quant": "q4f16_1"}
    target = target_of(get_arch("sm_90"))
    tag = _json.dumps({"template": tpl.name, "workload": wl, "site": "qkv"}, sort_keys=True)
    func = tpl.compute(wl).with_attr(KERNEL_ATTR, tag).with_attr("op_pattern", 8).with_attr("global_symbol", "k")
    db = TuningDB(tmp_path / "t.db")
    for device, tx, us in (("NVIDIA H200", 32, 7.0), ("NVIDIA H100 80GB HBM3", 64, 10.0)):
        db.add(Record(template=tpl.name, template_hash=tpl.source_hash, workload=wl, arch="sm_90", shards=1,
                      device=device, compute_units=132, knobs={**tpl.default_knobs(wl, target), "tx": tx},
                      latency_us=us, latency_spread_us=0.1, runs=10, bandwidth_gbps=10.0, max_rel_error=1e-4,
                      tvm_version=installed_tvm_version()))
    for device, tx in (("NVIDIA H100 80GB HBM3", 64), (None, 32), ("NVIDIA A100", 32)):
        (entry,) = apply_database(tvm.IRModule({"k": func}), db, "sm_90", 1, target, device)
        assert entry["knobs"]["tx"] == tx and entry["measured_on"] != "NVIDIA A100", (device, entry)
    # A 2-shard build of the same per-shard workload: the H100's 1-shard record beats the H200's
    # 2-shard one for an H100; with no device named, the build's own shard count comes first.
    db.add(Record(template=tpl.name, template_hash=tpl.source_hash, workload=wl, arch="sm_90", shards=2,
                  device="NVIDIA H200", compute_units=132, knobs={**tpl.default_knobs(wl, target), "tx": 128},
                  latency_us=6.0, latency_spread_us=0.1, runs=10, bandwidth_gbps=10.0, max_rel_error=1e-4,
                  tvm_version=installed_tvm_version()))
    for device, tx in (("NVIDIA H100 80GB HBM3", 64), (None, 128)):
        (entry,) = apply_database(tvm.IRModule({"k": func}), db, "sm_90", 2, target, device)
        assert entry["knobs"]["tx"] == tx, (device, entry)
