"""Checkpoint loading: HF layouts (single, sharded), our own checkpoints, tokenizers, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import constant_state as cs
from helpers import max_diff, save_tiny_hf


def test_sharded_checkpoint_loads(tmp_path):
    d, hf = save_tiny_hf(tmp_path, "llama")
    sd = load_file(str(d / "model.safetensors"))
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(d / f), metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    ours = cs.load(str(d), dtype="float32")
    ids = torch.randint(0, 128, (1, 12))
    assert max_diff(ours(ids)[0], hf(ids).logits) <= 1e-4


def test_unknown_model_type_names_the_field(tmp_path):
    d, _ = save_tiny_hf(tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'gpt_neox'"):
        cs.load(str(d))


def test_missing_weight_is_named(tmp_path):
    d, _ = save_tiny_hf(tmp_path, "llama")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing weight.*layers\.1\.mlp\.up_proj\.weight"):
        cs.load(str(d))


def test_misshaped_weight_is_named(tmp_path):
    d, _ = save_tiny_hf(tmp_path, "llama")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"k_proj\.weight.*shape \(3, 64\)"):
        cs.load(str(d))


def test_missing_config_field_is_named(tmp_path):
    d, _ = save_tiny_hf(tmp_path, "qwen2")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_attention_heads"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_attention_heads"):
        cs.load(str(d))


def test_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="no such directory and not a preset"):
        cs.load(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown KV format"):
        cs.load("tiny-llama", kv="int3")


def test_own_checkpoint_round_trip(tmp_path):
    m = cs.load("tiny-llama")
    cs.save_checkpoint(m, tmp_path / "ckpt")
    cs.save_checkpoint(m, tmp_path / "ckpt")  # overwrite in place, atomically
    back = cs.load(str(tmp_path / "ckpt"))
    ids = torch.randint(0, 512, (1, 9))
    assert torch.equal(m(ids)[0], back(ids)[0])
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["family"] == "transformer"
    assert not (tmp_path / "ckpt.tmp").exists()


def test_tokenizer_is_loaded_with_the_checkpoint(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d, _ = save_tiny_hf(tmp_path, "llama")
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + [f"w{i}" for i in range(126)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>").save_pretrained(d)
    m = cs.load(str(d))
    assert m.tokenizer is not None
    assert m.tokenizer.encode("w3 w5", add_special_tokens=False) == [5, 7]


def test_state_specs_are_exact():
    m = cs.load("tiny-llama", kv={"format": "bf16", "block_size": 32})
    specs = m.state_specs()
    assert len(specs) == 4
    s = specs[0]
    assert (s.num_kv_heads, s.head_dim, s.block_size, s.kv_format) == (2, 32, 32, "bf16")
    assert s.page_size_bytes == 2 * 32 * 2 * 32 * 2
    assert s.bytes_per_sequence(33) == 2 * s.page_size_bytes
