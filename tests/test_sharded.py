"""What of tensor parallelism runs without GPUs: the disco worker plumbing, the messages for
sharded builds that cannot run here, and the scaling report. The NCCL backend itself and
the TP-vs-TP1 agreement are tests/gpu/test_sharded_gpu.py."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import shardtune
from shardtune.errors import UserError
from shardtune.runtime.cli import scaling_table
from shardtune.runtime.sharded import disco


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "shardtune", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tp2_gpu_build(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp2") / "tiny-sm90-tp2"
    shardtune.build(str(path), model="tiny", random_weights=True, quant="q4f16_1", arch="sm_90", shards=2,
                    capacity=64, prefill=())
    return path


def test_sharded_build_without_gpus_is_one_line(tp2_gpu_build):
    res = _cli("bench", str(tp2_gpu_build), "--gen-len", "4")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"shardtune: error: {tp2_gpu_build} is sharded over 2 GPUs; 0 CUDA GPU(s) visible here"]


def test_sharded_cpu_build_is_refused(tmp_path):
    path = tmp_path / "tiny-cpu-tp2"
    shardtune.build(str(path), model="tiny", random_weights=True, quant="q4f16_1", arch="cpu", shards=2, capacity=64,
                    prefill=())
    with pytest.raises(UserError, match="no CPU collective backend"):
        shardtune.load(str(path))


def test_disco_workers_report_errors_instead_of_aborting(tmp_path):
    """Worker 0 is a thread of this process: an exception escaping it would abort pytest."""
    from shardtune.runtime import disco_worker  # noqa: F401 - worker 0's functions

    sess = disco().ProcessSession(num_workers=2, entrypoint="shardtune.runtime.disco_worker")
    sess.call_packed(sess.get_global_func("shardtune.shard.open"), str(tmp_path / "missing"), 0)
    errors = sess.call_packed(sess.get_global_func("shardtune.shard.error"))
    for w in range(2):
        assert "not a shardtune model folder" in errors.debug_get_from_remote(w)
    again = sess.call_packed(sess.get_global_func("shardtune.shard.error"))
    assert [again.debug_get_from_remote(w) for w in range(2)] == ["", ""]   # reported once
    del errors, again, sess


def _result(model, shards, tok_s):
    return {"model": model, "quant": "q4f16_1", "shards": shards, "decode_tok_s": tok_s,
            "device": f"{shards} x Some GPU" if shards > 1 else "Some GPU"}


def test_scaling_report_flags_a_fall_and_plots(tmp_path):
    results = [_result("a", 1, 100.0), _result("a", 2, 150.0), _result("b", 1, 300.0), _result("b", 2, 250.0)]
    table = scaling_table(results).splitlines()
    assert table[2].split()[-2:] == ["1.50x", "yes"] and table[4].split()[-2:] == ["0.83x", "NO"]
    files = []
    for i, r in enumerate(results):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(r))
    pytest.importorskip("matplotlib")
    res = _cli("bench", "--scaling", *map(str, files), "--json", str(tmp_path / "all.json"),
               "--plot", str(tmp_path / "s.png"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "all.json").read_text())) == 4


def test_several_folders_need_scaling(tp2_gpu_build):
    res = _cli("bench", str(tp2_gpu_build), str(tp2_gpu_build))
    assert res.returncode == 2 and "--scaling" in res.stderr


def test_gfx1100_two_shard_model_builds(tmp_path):
    """Two Radeon 7900 XTX: a complete sharded model, code objects included, without AMD hardware."""
    path = tmp_path / "tiny-gfx1100-tp2"
    conf = shardtune.build(str(path), model="tiny", random_weights=True, quant="q4f16_1", arch="gfx1100", shards=2,
                           capacity=64, prefill=())
    assert conf["shards"] == 2 and conf["target"]["kind"] == "rocm"
    assert (path / "model.so").stat().st_size > 10_000
    assert conf["cache"]["shape"][0] == 2   # tiny's 4 KV heads, two per shard


def test_gfx1100_one_gpu_model_builds_with_its_greedy_step(tmp_path):
    """One Radeon: the decode step's argmax has no CUDA warp shuffle there (TVM's ROCm backend is
    LLVM), it takes its other path through shared memory. The prefill GEMM's tensor-core schedule is
    CUDA's: there dlight's Matmul schedules its compute."""
    path = tmp_path / "tiny-gfx1100"
    conf = shardtune.build(str(path), model="tiny", random_weights=True, quant="q4f16_1", arch="gfx1100",
                           capacity=64, prefill=(16,))
    assert conf["device_greedy"] and conf["target"]["kind"] == "rocm"
    assert {k["source"] for k in conf["kernels"] if k["template"] == "q4f16_1_gemm"} == {"dlight"}
    assert (path / "model.so").stat().st_size > 10_000


def test_eight_shards_split_llama2_70b_and_sixteen_do_not():
    """Nothing assumes at most four GPUs: at 8 each shard has 8 query heads and 1 KV head."""
    from shardtune.compiler.weights import param_specs
    from shardtune.models import load_config
    from shardtune.plan import decode_plan

    cfg = load_config("llama2-70b")
    spec = param_specs(cfg, "q4f16_1", 8)
    assert spec["layers.0.qkv.qweight"][0] == ((8 + 2) * 128, 8192 // 8)
    assert spec["layers.0.down.qweight"][0] == (8192, 28672 // 8 // 8)
    attention = [c for c in decode_plan(cfg, "q4f16_1", 8) if c.site == "attention"][0]
    assert (attention.workload["q_heads"], attention.workload["kv_heads"]) == (8, 1)
    with pytest.raises(UserError, match=r"KV heads \(8\)"):
        param_specs(cfg, "q4f16_1", 16)


def test_an_eight_shard_model_builds_with_its_head_split_and_gathered(tmp_path):
    """TP8 end to end without eight GPUs: the fused all-reduce over 8 peers, the LM head in 8 row
    slices and its logits all-gathered, compiled for sm_90."""
    cfg = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8,
           "num_key_value_heads": 8, "num_hidden_layers": 1, "vocab_size": 2048, "rms_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    conf = shardtune.build(str(tmp_path / "tp8"), model=str(tmp_path / "config.json"), random_weights=True,
                           quant="q4f16_1", arch="sm_90", shards=8, capacity=64, prefill=())
    params = {name: shape for name, shape, _ in conf["params"]}
    assert params["lm_head.qweight"] == [2048 // 8, 1024 // 8] and conf["lm_head_split"]
    assert params["layers.0.qkv.qweight"] == [3 * 128, 1024 // 8]   # 1 query head and 1 KV head a shard
    fused = [k for k in conf["kernels"] if k["site"] == "allreduce_norm"]
    assert fused and fused[0]["workload"]["shards"] == 8
    assert conf["cuda_graphs"] == {"decode": 1, "decode_nccl": 1}


@pytest.mark.parametrize("protocol", ["flag", "ll"])
@pytest.mark.parametrize("shards", [1, 2, 4, 8])
def test_allreduce_add_norm_arithmetic_on_cpu(shards, protocol):
    """The fused all-reduce + residual + RMSNorm, peers' partials waiting for round 1."""
    import numpy as np
    import tvm

    from shardtune.kernels import get_template
    from shardtune.tuner.targets import get_arch, target_of

    tpl, cpu = get_template("allreduce_add_norm"), target_of(get_arch("cpu"))
    wl = {"H": 512, "shards": shards, "batch": 1}
    inputs = tpl.inputs(wl, np.random.default_rng(shards))
    args = [tvm.runtime.tensor(a) for a in inputs]
    tvm.compile(tpl.schedule(wl, {"protocol": protocol}, cpu), target=cpu)["main"](*args)
    y_ref, h_ref = tpl.reference(inputs)
    np.testing.assert_array_equal(args[-1].numpy(), h_ref)
    np.testing.assert_allclose(args[-2].numpy().astype(np.float32), y_ref.astype(np.float32), atol=2e-3, rtol=2e-3)
    assert args[3 + shards].numpy()[0] == 1                                      # round counter moved on
    own = inputs[0][0]
    if protocol == "flag":
        np.testing.assert_array_equal(args[3].numpy()[1], own)                   # own partial in slot 1
    for p in range(1, shards if protocol == "ll" else 1):   # ll: own partial pushed to every peer
        line = args[3 + 2 * shards + p].numpy()[1, shards - p]                 # where peer p sees this GPU
        np.testing.assert_array_equal(line[:, 0], own.view(np.int32))
        assert (line[:, 1] == 1).all()


@pytest.mark.parametrize("protocol", ["flag", "ll"])
def test_allreduce_add_norm_inputs_serve_every_round(protocol):
    """Timing runs the kernel round after round on one GPU's inputs: rounds 2 and 4 use slot 0,
    whose lines must say ready too (before, `ll` waited there forever and `flag` summed zeros)."""
    import numpy as np
    import tvm

    from shardtune.kernels import get_template
    from shardtune.kernels.allreduce_add_norm import READY
    from shardtune.tuner.targets import get_arch, target_of

    tpl, cpu, shards = get_template("allreduce_add_norm"), target_of(get_arch("cpu")), 4
    wl = {"H": 512, "shards": shards, "batch": 1}
    inputs = tpl.inputs(wl, np.random.default_rng(0))
    lines = inputs[3 + 2 * shards]
    assert (lines[:, 1:, :, 1] == READY).all()      # what the GPU's wait checks, in both slots
    args = [tvm.runtime.tensor(a) for a in inputs]
    run = tvm.compile(tpl.schedule(wl, {"protocol": protocol}, cpu), target=cpu)["main"]
    y_ref, h_ref = tpl.reference(inputs)
    for rnd in range(1, 5):
        run(*args)
        assert args[3 + shards].numpy()[0] == rnd
        np.testing.assert_array_equal(args[-1].numpy(), h_ref)
        np.testing.assert_allclose(args[-2].numpy().astype(np.float32), y_ref.astype(np.float32),
                                   atol=2e-3, rtol=2e-3)


def test_allreduce_add_norm_cuda_has_the_barrier_and_rocm_is_refused():
    import shutil
    import subprocess

    import tvm

    from shardtune.kernels import get_template
    from shardtune.tuner.targets import get_arch, target_of

    tpl = get_template("allreduce_add_norm")
    wl = {"H": 8192, "shards": 8, "batch": 1}
    cuda = target_of(get_arch("sm_90"))
    sources = {}
    for protocol in tpl.gpu_knobs["protocol"]:
        ex = tvm.compile(tpl.schedule(wl, {"threads": 512, "vec": 8, "protocol": protocol}, cuda), target=cuda)
        # the generated source after TVM's post-processing hook (which adds our helpers)
        sources[protocol] = tvm.get_global_func("tvm_callback_cuda_postproc")(ex.mod.imports[0].inspect_source(), cuda)
    flag, ll = sources["flag"], sources["ll"]
    assert flag.count("atomicExch") == 7 and "__threadfence_system()" in flag   # one flag per peer
    assert "st.volatile.global.v2.u32" in ll and ll.count("st_ll_store(") == 7 * 8 + 1   # 8 lines a thread
    # ... all loaded before the first wait (one round trip): 56 loads, then 56 waits
    body = ll[ll.index("__global__"):]
    assert body.count("st_ll_load(") == 56 and body.rindex("st_ll_load(") < body.index("st_ll_wait(")
    # A cluster of blocks: the norm's sum over the cluster, the flags posted by its first block.
    for protocol in tpl.gpu_knobs["protocol"]:
        knobs = {"threads": 256, "vec": 8, "protocol": protocol, "blocks": 4}
        assert tpl.check(wl, knobs, target_of(get_arch("sm_80"))) == "a cluster of blocks needs sm_90 or newer"
        ex = tvm.compile(tpl.schedule(wl, knobs, cuda), target=cuda)
        src = tvm.get_global_func("tvm_callback_cuda_postproc")(ex.mod.imports[0].inspect_source(), cuda)
        body = src[src.index("__global__"):]
        assert "mapa.shared::cluster" in src and body.count("st_cluster_put(") == 1
        assert body.count("st_cluster_sync()") == (3 if protocol == "flag" else 1)
        sources[f"{protocol}-cluster"] = src
    assert "the peer barrier is CUDA-only" == tpl.check(wl, {"threads": 256, "vec": 8, "protocol": "ll"},
                                                        target_of(get_arch("gfx1100")))
    if shutil.which("nvcc"):   # where a CUDA toolkit is installed: the code compiles
        for protocol, src in sources.items():
            cu = Path(tempfile.mkdtemp()) / f"{protocol}.cu"
            cu.write_text(src)
            res = subprocess.run(["nvcc", "-arch=sm_90", "-c", "-o", os.devnull, str(cu)], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-2000:]


def test_nvidia_tp_builds_fuse_the_allreduce_and_keep_an_nccl_decode(tmp_path):
    conf = shardtune.build(str(tmp_path / "fused"), model="tiny", random_weights=True, quant="q4f16_1", arch="sm_90",
                           shards=2, capacity=64, prefill=())   # allreduce "auto"
    sites = {k["site"]: k["template"] for k in conf["kernels"]}
    assert conf["allreduce"] == "fused" and sites["allreduce_norm"] == "allreduce_add_norm"
    assert sites["add_norm"] == "add_rms_norm"   # decode_nccl's, for GPUs without peer access
    assert conf["cuda_graphs"] == {"decode": 1, "decode_nccl": 1}
    for arch, shards in (("sm_90", 1), ("gfx1100", 2)):
        res = _cli("build", "--model", "tiny", "--random-weights", "--arch", arch, "--shards", str(shards),
                   "--allreduce", "fused", "-o", str(tmp_path / f"bad-{arch}"))
        assert res.returncode == 2 and "--allreduce fused needs" in res.stderr and len(res.stderr.splitlines()) == 1


def test_fused_allreduce_is_tuned_per_shard_count(tmp_path):
    records = shardtune.tune(arch="cpu", shards=2, model="tiny", db=str(tmp_path / "t.db"), trials_per_kernel=1,
                             kernels=["allreduce"], progress=False)
    assert [(r.template, r.workload["shards"], r.shards) for r in records] == [("allreduce_add_norm", 2, 2)]


def test_doctor_says_whether_multi_gpu_runs_can_work_here():
    res = _cli("doctor")
    assert res.returncode == 0
    line = next(line for line in res.stdout.splitlines() if line.startswith("multi-GPU"))
    assert "NCCL backend buildable" in line or "not found" in line


@pytest.mark.parametrize("shards,knobs", [
    (2, {"threads": 128, "vec": 2, "protocol": "ll", "blocks": 2}),
    (2, {"threads": 128, "vec": 2, "protocol": "flag", "blocks": 2}),
    (4, {"threads": 128, "vec": 4, "protocol": "ll", "blocks": 1}),
    (4, {"threads": 128, "vec": 4, "protocol": "flag", "blocks": 1}),
    (4, {"threads": 128, "vec": 2, "protocol": "ll", "blocks": 4}),
    (8, {"threads": 128, "vec": 8, "protocol": "flag", "blocks": 1}),
], ids=["ll-cluster-tp2", "flag-cluster-tp2", "ll-tp4", "flag-tp4", "ll-cluster-tp4", "flag-tp8"])
def test_allreduce_add_norm_ranks_on_cpu_threads(shards, knobs, rank_reference, tmp_path):
    """The real peer protocol without GPUs: the sm_90 CUDA C of the kernel on CPU threads
    (tests/emulator.py), N ranks launched at once, each with its own peer-visible buffer and the
    others' as its peers'. Three rounds with new partials: both slots, the round counter, the
    flags or lines of each round, and on a cluster the norm's sum shared between its blocks."""
    import threading

    import numpy as np
    import tvm

    from emulator import emulate
    from shardtune.kernels import get_template
    from shardtune.kernels.allreduce_add_norm import comm_bytes, comm_regions
    from shardtune.tuner.targets import get_arch, target_of

    tpl, sm90, H = get_template("allreduce_add_norm"), target_of(get_arch("sm_90")), 1024
    wl = {"H": H, "shards": shards, "batch": 1}
    assert tpl.check(wl, knobs, sm90) is None
    (kernel,) = emulate(tvm.compile(tpl.schedule(wl, knobs, sm90), target=sm90).mod.imports[0].inspect_source(),
                        tmp_path).values()
    rng = np.random.default_rng(shards)
    own = [np.zeros(comm_bytes(H, shards), np.uint8) for _ in range(shards)]
    residual = rng.standard_normal((1, H)).astype(np.float16)
    weight = (1 + 0.1 * rng.standard_normal(H)).astype(np.float16)
    ranks = []
    for r in range(shards):   # rank r's view: its slots, flags and lines first, then its peers' in order
        arrays = {"residual": residual, "weight": weight, "y": np.zeros((1, H), np.float16),
                  "h": np.zeros((1, H), np.float16)}
        for (at, shape, dtype), name in zip(comm_regions(H, shards), ("comm", "flags", "lines")):
            for p in range(shards):
                region = own[(r + p) % shards][at:at + int(np.prod(shape)) * np.dtype(dtype).itemsize]
                arrays[f"{name}_{p}"] = region.view(dtype).reshape(shape)
        ranks.append(arrays)
    for rnd in range(1, 4):
        partials = [rng.standard_normal(H).astype(np.float16) for _ in range(shards)]
        for r in range(shards):
            ranks[r]["partial"] = partials[r][None]
        threads = [threading.Thread(target=kernel, args=(ranks[r], knobs["blocks"], 1, knobs["blocks"]), daemon=True)
                   for r in range(shards)]
        for t in threads:
            t.start()
        for t in threads:   # a broken barrier spins forever: fail, do not hang
            t.join(timeout=120)
            assert not t.is_alive(), f"round {rnd}: the ranks did not finish (barrier) with {knobs}"
        for r in range(shards):
            y_ref, h_ref = rank_reference(partials, residual, weight, r)
            np.testing.assert_array_equal(ranks[r]["h"][0], h_ref, err_msg=f"rank {r} round {rnd}")
            np.testing.assert_allclose(ranks[r]["y"][0].astype(np.float32), y_ref.astype(np.float32), atol=2e-3,
                                       rtol=2e-3, err_msg=f"rank {r} round {rnd}")
            assert ranks[r]["flags_0"][0] == rnd   # the round counter moved on
