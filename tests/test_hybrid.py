"""Hybrid (attention + Mamba-2 per layer) models on the same state interface and generate loop."""

import torch

import constant_state as cs
from constant_state.eval.memory import memory_rows
from constant_state.models.config import PRESETS
from constant_state.state import PagedKVState, RecurrentState
from models_under_test import FACTORIES


def test_state_mixes_paged_and_recurrent_layers():
    m = FACTORIES["hybrid"]()
    state = m.init_state(2, max_context=32)
    kinds = [type(l) for l in state.layers]
    assert kinds == [PagedKVState, RecurrentState, RecurrentState]
    m(torch.randint(0, 96, (2, 9)), state)
    page = state.specs[0].page_size_bytes
    fixed = sum(s.fixed_bytes for s in state.specs[1:])
    assert state.nbytes() == 2 * fixed + 2 * 3 * page  # 9 tokens = 3 blocks of 4 per row


def test_batched_prompts_match_one_at_a_time():
    m = FACTORIES["hybrid"]()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 9]]
    batched = m.generate(prompts, max_new_tokens=6)
    for i, p in enumerate(prompts):
        alone = m.generate([p], max_new_tokens=6)
        assert batched[i, -6:].tolist() == alone[0, -6:].tolist()


def test_checkpoint_round_trip(tmp_path):
    m = FACTORIES["hybrid"]()
    cs.save_checkpoint(m, tmp_path / "h")
    back = cs.load(str(tmp_path / "h"))
    assert type(back).__name__ == "HybridLM" and back.config.mamba_layers == [1, 2]
    ids = torch.randint(0, 96, (1, 11))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
    assert torch.allclose(m(ids)[0], back(ids)[0], atol=1e-6)  # same weights; strides may pick other kernels


def test_hybrid_preset_memory_is_half_the_kv_plus_constant_state():
    hyb, base = PRESETS["llama-3-8b-hybrid-50"], PRESETS["llama-3-8b"]
    (h,) = memory_rows("h", hyb, 131072, 1, ["bf16"])
    (t,) = memory_rows("t", base, 131072, 1, ["bf16"])
    fixed = sum(s.fixed_bytes for s in hyb.state_specs() if hasattr(s, "fixed_bytes"))
    assert h.per_sequence == t.per_sequence // 2 + fixed
    assert h.kv_layers == 16 and h.recurrent_layers == 16
