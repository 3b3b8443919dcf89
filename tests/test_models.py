import json

import pytest

from shardtune.errors import UserError
from shardtune.models import PRESETS, check_shards, linears, load_config


def test_llama2_70b_tp2_shapes():
    by_name = {lin.name: lin for lin in linears(PRESETS["llama2-70b"], 2)}
    assert (by_name["qkv_proj"].N, by_name["qkv_proj"].K) == ((64 + 16) * 128 // 2, 8192)
    assert (by_name["o_proj"].N, by_name["o_proj"].K) == (8192, 4096)
    assert (by_name["gate_up_proj"].N, by_name["gate_up_proj"].K) == (28672, 8192)
    assert (by_name["down_proj"].N, by_name["down_proj"].K) == (8192, 14336)
    assert (by_name["lm_head"].N, by_name["lm_head"].parallel) == (16000, "column")   # logits gathered


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_every_preset_shards_to_eight(model):
    cfg = PRESETS[model]
    for shards in (1, 2, 4, 8):
        if model == "tiny" and shards == 8:
            continue  # 4 KV heads
        lins = linears(cfg, shards)
        # Column-parallel N and row-parallel K shrink by the shard count; the whole is preserved.
        assert sum(lin.N for lin in lins if lin.parallel == "column") * shards == \
            sum(lin.N for lin in linears(cfg, 1) if lin.parallel == "column")


def test_bad_shard_count_names_what_does_not_divide():
    with pytest.raises(UserError, match=r"3 shards do not divide llama2-70b's query heads \(64\), KV heads \(8\)"):
        check_shards(PRESETS["llama2-70b"], 3)
    with pytest.raises(UserError, match="positive"):
        check_shards(PRESETS["tiny"], 0)


def test_hf_config_and_bad_configs(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
           "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 1000, "rope_theta": 500000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = load_config(str(tmp_path))
    assert (c.hidden_size, c.num_key_value_heads, c.head_dim, c.rope_theta) == (512, 2, 64, 500000.0)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="not a Llama config"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable JSON"):
        load_config(str(tmp_path / "config.json"))
    with pytest.raises(UserError, match="unknown model"):
        load_config("llama9-1t")
