"""The generate loop: sampling settings, seeds, stop tokens, streaming, prefix sharing, bad input."""

import pytest
import torch

import constant_state as cs
from constant_state.generate import SamplingConfig, sample
from models_under_test import FACTORIES


@pytest.fixture(scope="module")
def model():
    return FACTORIES["llama"]()


def test_greedy_is_default_and_deterministic(model):
    ids = torch.randint(0, 96, (2, 7))
    a, b = model.generate(ids, max_new_tokens=10), model.generate(ids, max_new_tokens=10)
    assert a.shape == (2, 17) and a.dtype == torch.long
    assert torch.equal(a, b) and torch.equal(a[:, :7], ids)


def test_seeded_sampling_reproducible_and_different_from_greedy(model):
    ids = torch.randint(0, 96, (2, 5))
    kw = dict(max_new_tokens=24, temperature=1.5, top_k=50, top_p=0.95)
    a = model.generate(ids, seed=3, **kw)
    assert torch.equal(a, model.generate(ids, seed=3, **kw))
    assert not torch.equal(a, model.generate(ids, seed=4, **kw))
    assert not torch.equal(a, model.generate(ids, max_new_tokens=24))


def test_top_k_one_is_greedy(model):
    ids = torch.randint(0, 96, (1, 5))
    assert torch.equal(model.generate(ids, max_new_tokens=8, temperature=0.7, top_k=1, seed=0),
                       model.generate(ids, max_new_tokens=8))


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = SamplingConfig(temperature=1.0, top_p=0.7)
    g = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, cfg, g)) for _ in range(200)}
    assert seen == {0, 1}


def test_stop_tokens_pad_and_end(model):
    ids = torch.randint(0, 96, (2, 5))
    free = model.generate(ids, max_new_tokens=12)
    stop = int(free[0, 7])  # the third generated token of row 0
    out = model.generate(ids, max_new_tokens=12, stop_tokens=[stop], pad_token_id=95)
    row = out[0, 5:].tolist()
    first = row.index(stop)
    assert all(t == 95 for t in row[first + 1:])
    if stop not in free[1, 5:].tolist():
        assert out.shape[1] == 17  # row 1 never stopped: full length


def test_streaming_callback_sees_every_step(model):
    ids = torch.randint(0, 96, (3, 4))
    seen = []
    out = model.generate(ids, max_new_tokens=6, on_tokens=lambda step, t: seen.append((step, t.tolist())))
    assert [s for s, _ in seen] == list(range(6))
    assert torch.equal(torch.tensor([t for _, t in seen]).T, out[:, 4:])


def test_prefix_caching_gives_same_tokens_with_fewer_blocks(model):
    base = torch.randint(0, 96, (19,)).tolist()
    prompts = [base + [1, 2], base + [3], base + [4, 5, 6]]
    plain, s1 = model.generate(prompts, max_new_tokens=5, return_state=True)
    cached, s2 = model.generate(prompts, max_new_tokens=5, prefix_caching=True, return_state=True)
    assert torch.equal(plain, cached)
    assert s2.num_blocks_held() < s1.num_blocks_held()
    assert s2.nbytes() < s1.nbytes()


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_invalid_sampling_settings_name_the_field(model, kwargs, field):
    kw = dict(max_new_tokens=4)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=field):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **kw)


def test_context_beyond_capacity_names_max_context(model):
    state = model.init_state(1, max_context=8)
    model(torch.zeros(1, 6, dtype=torch.long), state)
    with pytest.raises(ValueError, match="max_context=8"):
        model(torch.zeros(1, 3, dtype=torch.long), state)
    assert state.seq_lens_host == [6]  # untouched
    model(torch.zeros(1, 2, dtype=torch.long), state)  # still usable up to capacity


def test_full_pool_raises_and_other_sequences_continue(model):
    state = model.init_state(2, max_context=16, num_blocks=5)  # block size 4
    ids = torch.randint(0, 96, (2, 8))
    model(ids, state)  # 4 blocks used
    fork = state.fork([0])
    with pytest.raises(cs.KVCacheFullError, match="num_blocks=5"):
        model(ids[:, :5], state)  # needs 2 more blocks
    # The failed call changed nothing: the state continues exactly like a fresh one.
    out, _ = model(ids[:1, :1], fork)
    ref, _ = model(torch.cat([ids[:1], ids[:1, :1]], 1))
    assert (out[:, -1] - ref[:, -1]).abs().max() < 1e-4


def test_clone_is_independent(model):
    ids = torch.randint(0, 96, (1, 10))
    state = model.init_state(1, max_context=20, num_blocks=20)
    model(ids, state)
    twin = state.clone()
    assert twin.num_blocks_held() == state.num_blocks_held()
    assert not set(twin.seqs[0].blocks) & set(state.seqs[0].blocks)
    a, _ = model(ids[:, :3], state)
    b, _ = model(ids[:, :3], twin)
    assert torch.allclose(a, b, atol=1e-5)


def test_bad_input_ids(model):
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[1, 2], []], max_new_tokens=2)
