"""Evicting KV caches (StreamingLLM, H2O): bounded memory, blocks back to the pool, positions kept."""

import dataclasses

import pytest
import torch

import constant_state as cs
from constant_state.cache.block_pool import SeqBlocks
from constant_state.cache.eviction import H2O, StreamingLLM, make_policy
from models_under_test import TINY_LLAMA

BS = 4


def _model(**kv):
    m = cs.build_model(TINY_LLAMA, dtype="float32", seed=0)
    m.kv_config = cs.KVConfig(block_size=BS, **kv)
    return m


class _MaskOnly(StreamingLLM):
    """StreamingLLM's attention mask without dropping blocks: the reference for physical eviction."""

    def droppable(self, seq, n_new, bs, scores=None):
        return []


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_streaming_eviction_equals_masking(fmt):
    """Dropping blocks (and shifting cache indices) changes nothing but memory: logits equal those of
    a cache that keeps every block and only masks (same sinks, same window, same positions)."""
    m = _model(format=fmt)
    specs = m.state_specs()
    ids = torch.randint(0, TINY_LLAMA.vocab_size, (2, 60), generator=torch.Generator().manual_seed(0))
    policy = StreamingLLM(sinks=2, window=9)
    real = cs.ModelState.allocate(specs, 2, max_context=64, eviction=policy)
    ref = cs.ModelState.allocate(specs, 2, max_context=64, eviction=_MaskOnly(2, 9))
    a = [m(ids[:, :11], real)[0]]
    b = [m(ids[:, :11], ref)[0]]
    for t in range(11, 60):
        a.append(m(ids[:, t:t + 1], real)[0])
        b.append(m(ids[:, t:t + 1], ref)[0])
        assert real.num_blocks_held() <= 2 * (1 + -(-9 // BS) + 1)  # per row: sink block, window, open block
    assert (torch.cat(a, 1) - torch.cat(b, 1)).abs().max().item() <= 1e-4
    assert (real.pos_offset + real.seq_lens).tolist() == [60, 60]
    assert ref.num_blocks_held() == 2 * 15 and real.num_blocks_held() < ref.num_blocks_held()


@torch.no_grad()
def test_streaming_matches_explicit_attention_mask():
    """StreamingLLM attends to exactly the first S and the last W tokens (checked against a full
    forward with an explicit mask on one layer's attention)."""
    from constant_state.kernels.paged_attention.ref import paged_attention_ref

    k = torch.randn(1, 30, 2, 16)
    v = torch.randn(1, 30, 2, 16)
    q = torch.randn(1, 1, 4, 16)
    out = paged_attention_ref(q, k, v, torch.tensor([[0]]), torch.tensor([30]), 0.25, sliding_window=5, sinks=3)
    keep = torch.tensor([0, 1, 2, 25, 26, 27, 28, 29])
    want = paged_attention_ref(q, k[:, keep], v[:, keep], torch.tensor([[0]]), torch.tensor([8]), 0.25)
    assert torch.allclose(out, want, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("kv", [dict(eviction="streaming", sink_tokens=4, window_tokens=12),
                                dict(eviction="h2o", budget=16, window_tokens=8)], ids=["streaming", "h2o"])
def test_generate_memory_bounded_and_blocks_returned(kv):
    m = _model(**kv)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12]]
    seen = []
    out, state = m.generate(prompts, max_new_tokens=50, return_state=True,
                            on_tokens=lambda step, tok: seen.append(None))
    assert out.shape == (2, 11 + 50)
    pool = state.kv_pool.manager.pool
    bound = 2 * (-(-16 // BS) + 2)  # per row: the window / budget plus a sink and an open block
    assert pool.num_used <= bound
    assert (state.pos_offset + state.seq_lens).tolist() == [7 + 49, 11 + 49]
    with torch.inference_mode():
        state.release()
    assert pool.num_free == pool.num_blocks
    pool.check()


@torch.no_grad()
def test_memory_stays_bounded_over_a_long_decode():
    m = _model(eviction="h2o", budget=12, window_tokens=4)
    state = m.init_state(1, max_context=400)
    m(torch.tensor([[1, 2, 3, 4, 5]]), state)
    held = []
    for t in range(300):
        m(torch.tensor([[t % 90]]), state)
        held.append(state.nbytes())
    assert max(held) <= (12 // BS + 2) * state.kv_pool.page_bytes_all_layers
    assert int(state.pos_offset + state.seq_lens) == 305


def test_h2o_keeps_heavy_hitters_and_recent_window():
    p = H2O(budget=12, recent=4)
    seq = SeqBlocks(blocks=[10, 11, 12, 13, 14, 15], num_tokens=24)
    scores = [0.0] * 16
    scores[11], scores[13] = 5.0, 3.0  # heavy blocks at columns 1 and 3
    drop = p.droppable(seq, 1, 4, scores)
    # Columns 5 (recent: tokens 21..23 within the last 4) stays; 2 heavy of the older ones stay.
    assert drop == [0, 2, 4]


def test_streaming_droppable_columns():
    p = StreamingLLM(sinks=4, window=8)
    seq = SeqBlocks(blocks=list(range(6)), num_tokens=24)
    # First query at cache index 24 sees >= 17 and the sinks (< 4): columns 1..3 end before 17.
    assert p.droppable(seq, 1, 4) == [1, 2, 3]


def test_config_validation_names_flags():
    with pytest.raises(ValueError, match="--kv-eviction"):
        cs.KVConfig(eviction="lru")
    with pytest.raises(ValueError, match="--kv-eviction"):
        cs.KVConfig(window_tokens=10)
    with pytest.raises(ValueError, match="--kv-window"):
        cs.KVConfig(eviction="h2o", budget=8, window_tokens=20)
    with pytest.raises(ValueError, match="kivi2"):
        cs.KVConfig(format="kivi2", eviction="streaming")
    assert make_policy("streaming", sinks=None, window=None, budget=None) == StreamingLLM(4, 1020)
    assert dataclasses.asdict(make_policy("h2o", sinks=None, window=None, budget=None)) == {"budget": 1024,
                                                                                          "recent": 512}
