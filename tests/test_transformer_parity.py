"""Logits and greedy generation against transformers' own Llama / Mistral / Qwen2."""

import pytest
import torch

import constant_state as cs
from helpers import max_diff, save_tiny_hf

FAMILIES = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_logits_match_hf(tmp_path, model_type):
    d, hf = save_tiny_hf(tmp_path, model_type)
    ours = cs.load(str(d), dtype="float32")
    ids = torch.randint(0, 128, (2, 37))  # longer than mistral's window of 24
    with torch.no_grad():
        ref = hf(ids).logits
    logits, state = ours(ids)
    assert logits.shape == ref.shape
    assert max_diff(logits, ref) <= 1e-4
    assert state.seq_lens_host == [37, 37]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_generate_matches_hf(tmp_path, model_type):
    d, hf = save_tiny_hf(tmp_path, model_type)
    ours = cs.load(str(d), dtype="float32")
    ids = torch.randint(0, 128, (1, 9))
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    out = ours.generate(ids, max_new_tokens=20)
    assert out.tolist() == ref.tolist()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_batched_prompts_of_different_lengths_match_hf(tmp_path, model_type):
    d, hf = save_tiny_hf(tmp_path, model_type)
    ours = cs.load(str(d), dtype="float32")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (5, 11, 11, 3)]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as HF wants for decoder-only generation
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    out = ours.generate(prompts, max_new_tokens=12)
    assert out[:, width:].tolist() == ref[:, width:].tolist()
    # The tensor + attention_mask form gives the same result.
    assert ours.generate(ids, attention_mask=mask, max_new_tokens=12).tolist() == out.tolist()
