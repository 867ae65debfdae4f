"""The generate loop on CUDA: the CUDA-graph decode step against eager steps and transformers."""

import pytest
import torch

import constant_state as cs
from helpers import save_tiny_hf

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_cuda_graph_generate_matches_eager_and_hf(tmp_path, model_type):
    d, hf = save_tiny_hf(tmp_path, model_type)
    hf = hf.cuda()
    ours = cs.load(str(d), device="cuda", dtype="float32")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (9, 4, 9, 13)]
    graphed = ours.generate(prompts, max_new_tokens=24, cuda_graph=True)
    eager = ours.generate(prompts, max_new_tokens=24, cuda_graph=False)
    assert torch.equal(graphed, eager)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ref = hf.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24, do_sample=False,
                      pad_token_id=0, eos_token_id=None).cpu()
    assert graphed[:, width:].tolist() == ref[:, width:].tolist()


def test_cuda_graph_state_matches_eager_state():
    m = cs.load("tiny-llama", device="cuda", dtype="float32")
    ids = torch.randint(0, 512, (3, 11))
    out_g, sg = m.generate(ids, max_new_tokens=40, cuda_graph=True, return_state=True)
    out_e, se = m.generate(ids, max_new_tokens=40, cuda_graph=False, return_state=True)
    assert torch.equal(out_g, out_e)
    assert sg.seq_lens.tolist() == se.seq_lens.tolist() == [11 + 39] * 3
    assert sg.nbytes() == se.nbytes()


def test_sampling_on_cuda_is_seeded():
    m = cs.load("tiny-llama", device="cuda", dtype="bfloat16")
    ids = torch.randint(0, 512, (4, 6))
    a = m.generate(ids, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=1)
    assert torch.equal(a, m.generate(ids, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=1))
