"""What of tensor parallelism runs without GPUs: the disco worker plumbing, the messages for
sharded builds that cannot run here, and the scaling report. The NCCL backend itself and
the TP-vs-TP1 agreement are tests/gpu/test_sharded_gpu.py."""
import json
import subprocess
import sys

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
                    capacity=64)
    return path


def test_sharded_build_without_gpus_is_one_line(tp2_gpu_build):
    res = _cli("bench", str(tp2_gpu_build), "--gen-len", "4")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"shardtune: error: {tp2_gpu_build} is sharded over 2 GPUs; 0 CUDA GPU(s) visible here"]


def test_sharded_cpu_build_is_refused(tmp_path):
    path = tmp_path / "tiny-cpu-tp2"
    shardtune.build(str(path), model="tiny", random_weights=True, quant="q4f16_1", arch="cpu", shards=2, capacity=64)
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
                           capacity=64)
    assert conf["shards"] == 2 and conf["target"]["kind"] == "rocm"
    assert (path / "model.so").stat().st_size > 10_000
    assert conf["cache"]["shape"][0] == 2   # tiny's 4 KV heads, two per shard
