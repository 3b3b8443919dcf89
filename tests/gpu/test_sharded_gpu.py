"""Tensor parallelism on 2 (and 4) GPUs: our NCCL backend under disco, and the sharded
model against the one-GPU build of the same checkpoint."""
import numpy as np
import pytest

import shardtune
from shardtune.runtime.sharded import start_session, visible_gpus
from shardtune.tuner.targets import local_gpu_arch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

GPUS = visible_gpus("cuda")
pytestmark = pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
PROMPT = [1, 7, 42, 99, 3, 250, 11, 8]


def test_nccl_allreduce_and_broadcast():
    import tvm

    n = 2
    sess = start_session(n)
    x = sess.empty((4, 1000), "float32")
    host = np.random.default_rng(0).standard_normal((4, 1000)).astype("float32")
    sess.broadcast(tvm.runtime.tensor(host), x)                  # worker 0 -> all
    y = sess.empty((4, 1000), "float32")
    sess.allreduce(x, y, "sum")
    for w in range(n):
        np.testing.assert_allclose(y.debug_get_from_remote(w).numpy(), n * host, rtol=1e-6)
    del x, y, sess   # the session stops its workers when its last handle goes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small Llama with the real head dim (128) and grouped-query attention that divides by 4."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
                                   num_key_value_heads=4, num_hidden_layers=4, vocab_size=4096,
                                   rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False,
                                   initializer_range=0.06, eos_token_id=None, bos_token_id=1)
    folder = tmp_path_factory.mktemp("hf") / "small-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


_one_gpu: dict = {}   # quant -> the TP1 run, shared by the TP2 and TP4 cases


def forced_logits(model, ids) -> np.ndarray:
    """The logits of each step when `ids` (another run's greedy ids) are fed back: two runs then see
    the same inputs at every step, so their logits compare all the way, near-ties or not."""
    steps = [model.prefill(PROMPT)]
    steps += [model.step(t, len(PROMPT) + i) for i, t in enumerate(ids[:-1])]
    return np.stack(steps)


def _generate(checkpoint, tmp_path, quant, shards, allreduce="nccl", n=64, forced=None):
    if shards == 1 and quant in _one_gpu:
        return _one_gpu[quant]
    path = tmp_path / f"{quant}-tp{shards}-{allreduce}"
    # one prefill bucket: every bucket is another set of kernels to compile (NVRTC, at load)
    shardtune.build(str(path), weights=str(checkpoint), quant=quant, arch=local_gpu_arch(), shards=shards,
                    capacity=256, prefill=(16,), allreduce=allreduce if shards > 1 else "nccl")
    model = shardtune.load(str(path))
    out = model.generate(PROMPT, max_new_tokens=n, return_logits=True, stop_at_eos=False)
    # the argmax on the GPUs (worker 0's token fed to all): the host's ids, token for token
    assert model.generate(PROMPT, max_new_tokens=n, stop_at_eos=False) == out[0]
    if shards > 1:   # the workers ran on their own tokens: every rank picked the same ones
        assert model.BATCHED_READS
        remote = model.sess.call_packed(model._greedy_steps, out[0][0], len(PROMPT), 16)
        ranks = [remote.debug_get_from_remote(w).numpy()[:16].tolist() for w in range(shards)]
        assert ranks == [out[0][1:17]] * shards
    if forced is not None:
        out = (*out, forced_logits(model, forced))
    model.close()
    if shards == 1:
        _one_gpu[quant] = out
    return out


@pytest.mark.parametrize("quant", ["q0f16", "q4f16_1"])
@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("allreduce", ["nccl", "fused"])
def test_sharded_matches_one_gpu(checkpoint, tmp_path, quant, shards, allreduce):
    if shards > GPUS:
        pytest.skip(f"needs {shards} GPUs")
    ref_ids, ref_logits = _generate(checkpoint, tmp_path, quant, 1)
    ids, logits, forced = _generate(checkpoint, tmp_path, quant, shards, allreduce, forced=ref_ids)
    scale = np.abs(ref_logits).max()
    # Sharding changes only the order of fp16 sums. Its size shows on the first step (same
    # input for both); a different id is excused only where the top two logits are closer.
    noise = np.abs(logits[0] - ref_logits[0]).max()
    assert noise < 1e-2 * scale
    agree = len(ref_ids)
    for i, (a, b) in enumerate(zip(ids, ref_ids)):
        top2 = np.sort(ref_logits[i])[-2:]
        if top2[1] - top2[0] < 4 * noise:
            agree = i
            break
        assert a == b, (i, ids, ref_ids)
    print(f"{quant} TP{shards} {allreduce}: ids agree for {agree} of {len(ref_ids)} tokens"
          f"{' (then a near-tie)' if agree < len(ref_ids) else ''}; first-step logit noise {noise / scale:.1e} of max")
    # logits compared only while both runs saw the same tokens; fed TP1's ids, at every step
    assert np.abs(logits[:agree + 1] - ref_logits[:agree + 1]).max() < 1e-2 * scale
    drift = np.abs(forced - ref_logits).max()
    print(f"  fed TP1's {len(ref_ids)} ids: largest logit difference {drift / scale:.1e} of max")
    assert drift < 1e-2 * scale


def test_fused_build_runs_its_nccl_step_on_request(checkpoint, tmp_path):
    """A fused build holds decode_nccl too (for GPUs without peer access): same weights, same ids."""
    path = tmp_path / "fused"
    shardtune.build(str(path), weights=str(checkpoint), quant="q0f16", arch=local_gpu_arch(), shards=2,
                    capacity=256, prefill=())
    runs = {}
    for allreduce in (None, "nccl"):
        model = shardtune.load(str(path), allreduce=allreduce)
        runs[model.allreduce_used] = model.generate(PROMPT, max_new_tokens=16, return_logits=True, stop_at_eos=False)
        model.close()
    (ids_f, logits_f), (ids_n, logits_n) = runs["fused"], runs["nccl"]
    assert ids_f == ids_n
    assert np.abs(logits_f - logits_n).max() < 1e-2 * np.abs(logits_n).max()
