"""compiler/weights.py: a tiny HF Llama checkpoint (one file, sharded with an index, bf16) to
shardtune's parameters, and every wrong checkpoint as one UserError line.

The checkpoint is made by transformers where it is installed (the real names and files); without it
(the `test` extra has no transformers) the same names are written here by a small safetensors writer,
which also makes the broken checkpoints."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from shardtune.compiler.weights import (QUANTS, convert, hf_shapes, param_specs, quantize_q4,
                                        read_checkpoint, shard_param)
from shardtune.errors import UserError
from shardtune.kernels.q4_gemv import dequantize, pack_q4, unpack_q4
from shardtune.models import PRESETS, LlamaConfig, load_config

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=100)


def write_safetensors(path, tensors, bf16=False):
    header, blobs, at = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, "<f4")
        raw = (a.view("<u4") >> 16).astype("<u2").tobytes() if bf16 else a.tobytes()  # bf16: truncate
        header[name] = {"dtype": "BF16" if bf16 else "F32", "shape": list(a.shape),
                        "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def save(folder, state, config, files=1, bf16=False):
    """A HF-style model folder: config.json and one model.safetensors, or `files` files and an index."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if files == 1:
        write_safetensors(folder / "model.safetensors", state, bf16)
        return folder
    weight_map = {}
    for j in range(files):
        part = {n: state[n] for n in list(state)[j::files]}
        fname = f"model-{j + 1:05d}-of-{files:05d}.safetensors"
        write_safetensors(folder / fname, part, bf16)
        weight_map.update(dict.fromkeys(part, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    try:
        import torch
        import transformers
    except ImportError:
        config = {"model_type": "llama", "tie_word_embeddings": False, **TINY}
        rng = np.random.default_rng(0)
        state = {n: (rng.standard_normal(s) * 0.02).astype(np.float32)
                 for n, s in hf_shapes(LlamaConfig("hf", **TINY)).items()}
        save(root / "single", state, config)
        save(root / "sharded", state, config, files=5)
        save(root / "bf16", state, config, bf16=True)
    else:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
        state = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
        model.save_pretrained(root / "single", safe_serialization=True)
        model.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="20KB")
        model.to(torch.bfloat16).save_pretrained(root / "bf16", safe_serialization=True)
        config = json.loads((root / "single" / "config.json").read_text())
    return SimpleNamespace(root=root, state=state, config=config,
                           cfg=load_config(str(root / "single" / "config.json")))


def params(folder, quant, shards=1, shard=0, cfg=None):
    return dict(convert(folder, cfg, quant, shards, shard))


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("quant", QUANTS)
def test_converted_params_match_their_specs(hf, quant, shards):
    specs = param_specs(hf.cfg, quant, shards)
    w = ".qweight" if quant == "q4f16_1" else ".weight"
    assert list(specs)[:3] == ["embed.weight", "layers.0.input_norm.weight", "layers.0.qkv" + w]
    head = ["lm_head.qweight", "lm_head.qscale"] if quant == "q4f16_1" else ["lm_head.weight"]
    assert list(specs)[-1 - len(head):] == ["norm.weight", *head]
    for shard in range(shards):
        got = list(convert(hf.root / "single", hf.cfg, quant, shards, shard))
        assert [name for name, _ in got] == list(specs)
        for name, a in got:
            assert (a.shape, str(a.dtype)) == specs[name], name


def test_q0f32_params_are_the_hf_tensors_rearranged(hf):
    st, D = hf.state, hf.cfg.head_dim
    hq, hkv = hf.cfg.num_attention_heads // 2, hf.cfg.num_key_value_heads // 2   # per shard
    shards = [params(hf.root / "single", "q0f32", 2, s) for s in (0, 1)]
    for i in range(hf.cfg.num_hidden_layers):
        hfp, p = f"model.layers.{i}.", f"layers.{i}."
        # each shard's qkv rows: its query heads, then its KV heads of k_proj, then of v_proj
        q, k, v = zip(*(np.split(sh[p + "qkv.weight"], [hq * D, (hq + hkv) * D]) for sh in shards))
        for part, x in [(q, "q"), (k, "k"), (v, "v")]:
            assert_array_equal(np.concatenate(part), st[hfp + f"self_attn.{x}_proj.weight"])
        gate, up = zip(*(np.split(sh[p + "gate_up.weight"], 2) for sh in shards))
        assert_array_equal(np.concatenate(gate), st[hfp + "mlp.gate_proj.weight"])
        assert_array_equal(np.concatenate(up), st[hfp + "mlp.up_proj.weight"])
        for ours, theirs in [("o", "self_attn.o_proj"), ("down", "mlp.down_proj")]:
            assert_array_equal(np.concatenate([sh[p + ours + ".weight"] for sh in shards], axis=1),
                               st[hfp + theirs + ".weight"])
        for sh in shards:
            assert_array_equal(sh[p + "input_norm.weight"], st[hfp + "input_layernorm.weight"])
            assert_array_equal(sh[p + "post_norm.weight"], st[hfp + "post_attention_layernorm.weight"])
    for sh in shards:
        assert_array_equal(sh["embed.weight"], st["model.embed_tokens.weight"])
        assert_array_equal(sh["norm.weight"], st["model.norm.weight"])
    # the LM head by vocabulary rows: shard order is vocabulary order, as the logits are gathered
    assert shards[0]["lm_head.weight"].shape[0] == hf.cfg.vocab_size // 2
    assert_array_equal(np.concatenate([sh["lm_head.weight"] for sh in shards]), st["lm_head.weight"])


@pytest.mark.parametrize("quant", ["q0f32", "q4f16_1"])
def test_shard_param_of_the_whole_is_the_converted_shard(hf, quant):
    whole = params(hf.root / "single", quant)
    for s in (0, 1):
        for name, a in params(hf.root / "single", quant, 2, s).items():
            assert_array_equal(shard_param(name, whole[name], hf.cfg, 2, s), a, err_msg=name)


def test_sharded_and_bf16_checkpoints(hf):
    sharded = hf.root / "sharded"
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    assert isinstance(read_checkpoint(sharded)["model.norm.weight"], np.memmap)  # read lazily
    ref = params(hf.root / "single", "q0f32", 2, 1)
    for name, a in params(sharded, "q0f32", 2, 1).items():
        assert_array_equal(a, ref[name], err_msg=name)
    assert read_checkpoint(hf.root / "bf16")["lm_head.weight"].dtype == np.float32
    for name, a in params(hf.root / "bf16", "q0f32", 2, 1).items():
        assert_allclose(a, ref[name], rtol=2 ** -7, atol=0, err_msg=name)  # one bf16 ulp


def test_q4_quantization_is_mlc_q4f16_1():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    w[3, 32:64] = 0        # an all-zero group
    w[5, :32] *= 1000      # groups of very different scales
    qweight, qscale = quantize_q4(w)
    assert (qweight.shape, qweight.dtype, qscale.shape, qscale.dtype) == ((16, 32), np.uint32, (16, 8), np.float16)
    assert_array_equal(qscale, (np.abs(w.reshape(16, 8, 32)).max(axis=2) / 7).astype(np.float16))
    scale = np.repeat(qscale.astype(np.float32), 32, axis=1)
    q = np.clip(np.rint(w / np.where(scale == 0, 1, scale)) + 7, 0, 14)
    assert_array_equal(unpack_q4(qweight), q)      # nibble i of word j is element 8j + i
    assert_array_equal(pack_q4(q), qweight)
    deq = dequantize(qweight, qscale)
    assert (np.abs(deq - w) <= scale / 2 + 1e-6 * np.abs(w)).all()
    assert (deq[3, 32:64] == 0).all()


def test_q4_params_dequantize_to_the_weights(hf):
    ref = params(hf.root / "single", "q0f32", 2, 1)
    q4 = params(hf.root / "single", "q4f16_1", 2, 1)
    for p in [f"layers.1.{name}" for name in ("qkv", "o", "gate_up", "down")] + ["lm_head"]:
        scale = np.repeat(q4[p + ".qscale"].astype(np.float32), 32, axis=1)
        err = np.abs(dequantize(q4[p + ".qweight"], q4[p + ".qscale"]) - ref[p + ".weight"])
        assert (err <= scale / 2 + 1e-6).all(), p
    assert "lm_head.weight" not in q4   # quantized like the other linear layers, as MLC-LLM's q4f16_1


def expect_error(match, folder, cfg=None, quant="q0f32", shards=1, shard=0):
    with pytest.raises(UserError, match=match) as e:
        list(convert(folder, cfg, quant, shards, shard))
    assert "\n" not in str(e.value)


def _drop(name):
    return lambda state, config: state.pop(name)


@pytest.mark.parametrize("change, match", [
    (_drop("model.layers.1.mlp.up_proj.weight"), r"model\.layers\.1\.mlp\.up_proj\.weight' is missing"),
    (_drop("lm_head.weight"), r"'lm_head\.weight' is missing \(and config\.json does not set tie_word_emb"),
    (lambda st, c: st.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((32, 64), np.float32)}),
     r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \[32, 64\], "
     r".* needs \[64, 64\]"),
    (lambda st, c: st.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
     r"q_proj\.bias'.*biases are not supported"),
    (lambda st, c: c.update(model_type="gpt2"), r"not a Llama config \(model_type='gpt2'\)"),
])
def test_wrong_checkpoints_say_what_is_wrong(hf, tmp_path, change, match):
    state, config = dict(hf.state), dict(hf.config)
    change(state, config)
    expect_error(match, save(tmp_path / "m", state, config))


def test_tied_embeddings_stand_in_for_the_lm_head(hf, tmp_path):
    state = {n: a for n, a in hf.state.items() if n != "lm_head.weight"}
    got = params(save(tmp_path / "m", state, dict(hf.config, tie_word_embeddings=True)), "q0f32")
    assert_array_equal(got["lm_head.weight"], hf.state["model.embed_tokens.weight"])


def test_wrong_folders_and_files(hf, tmp_path):
    expect_error("not a folder", tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps(hf.config))
    expect_error("no model.safetensors or model.safetensors.index.json$", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    expect_error(r"only PyTorch \.bin files", tmp_path)

    sharded = save(tmp_path / "sharded", hf.state, hf.config, files=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    expect_error(r"index\.json names model-00002-of-00003\.safetensors, which is not in", sharded)

    truncated = save(tmp_path / "truncated", hf.state, hf.config)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    expect_error(r"model\.safetensors: not a readable safetensors file \(tensor .* past the end", truncated)
    (truncated / "model.safetensors").write_bytes(b"not a safetensors file")
    expect_error(r"model\.safetensors: not a readable safetensors file", truncated)


def test_wrong_model_quant_or_shard(hf, tmp_path):
    single = hf.root / "single"
    expect_error(r"config\.json is not a tiny checkpoint: it has hidden_size 64 \(not 256\)", single, PRESETS["tiny"])
    bare = tmp_path / "bare"      # no config.json: the tensors' shapes still give it away
    bare.mkdir()
    write_safetensors(bare / "model.safetensors", hf.state)
    expect_error("no config.json", bare)
    expect_error(r"'model\.embed_tokens\.weight' has shape \[100, 64\], tiny needs \[512, 256\]", bare, PRESETS["tiny"])
    expect_error(r"unknown quantization 'q3f16': use one of q4f16_1, q0f16, q0f32", single, quant="q3f16")
    expect_error(r"shard 2 is not one of 0\.\.1", single, shards=2, shard=2)
    expect_error(r"3 shards do not divide", single, shards=3)
