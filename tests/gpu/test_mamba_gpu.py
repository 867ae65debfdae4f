"""Mamba on CUDA: mamba-ssm / causal-conv1d kernels (when they import) against our fp32 reference,
our model against mamba-ssm's own MambaLMHeadModel, and CUDA-graph decode through our generate loop.

Run on the GPU machine with mamba-ssm and causal-conv1d built (docs/mamba.md):
    PYTHONPATH=/tmp/cuda_site:$PWD python -m pytest -q tests/gpu/test_mamba_gpu.py
Without the kernels, the kernel tests skip and the rest run on the reference backend.
"""

import pytest
import torch

import constant_state as cs
from constant_state.kernels.mamba import get_ops
from constant_state.kernels.mamba.backend import kernels_available
from constant_state.models.mamba import Mamba2Config, MambaConfig, to_mamba_ssm
from helpers import assert_close

pytestmark = pytest.mark.gpu

HAVE_KERNELS = all(kernels_available().values())
needs_kernels = pytest.mark.skipif(not HAVE_KERNELS, reason=f"kernels not importable: {kernels_available()}")
BACKENDS = ["cuda", "ref"] if HAVE_KERNELS else ["ref"]

# max |err| / max |ref|, written once. fp32: mamba-ssm's Triton kernels use TF32 dots (HF measured
# 1.1e-3 between its kernel and torch paths for Mamba-2); bf16: inputs and states rounded to bf16.
RATIO = {torch.float32: 5e-3, torch.bfloat16: 3e-2}

SMALL = {
    "mamba": MambaConfig(vocab_size=1000, hidden_size=256, num_layers=4, dtype="float32"),
    "mamba2": Mamba2Config(vocab_size=1000, hidden_size=256, num_layers=4, head_dim=64, n_groups=2, chunk_size=64,
                           dtype="float32"),
}


def rnd(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to("cuda", dtype)


# -- ops: kernel vs reference -------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [1, 63, 500])
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "from_state"])
def test_mamba1_prefill_ops(dtype, t, fresh):
    g = torch.Generator().manual_seed(t)
    b, e, n, k = 2, 192, 16, 4
    ck, rf = get_ops("cuda", "cuda"), get_ops("cuda", "ref")
    x, z, delta = rnd(b, e, t, g=g, dtype=dtype), rnd(b, e, t, g=g, dtype=dtype), rnd(b, e, t, g=g, dtype=dtype)
    w, cb = rnd(e, k, g=g, dtype=dtype, scale=0.5), rnd(e, g=g, dtype=dtype)
    A = -torch.rand(e, n, generator=g).cuda() * 8
    B, C = rnd(b, n, t, g=g, dtype=dtype), rnd(b, n, t, g=g, dtype=dtype)
    D, bias = rnd(e, g=g), rnd(e, g=g, scale=0.5) - 2
    conv0 = torch.zeros(b, e, k, device="cuda", dtype=dtype) if fresh else rnd(b, e, k, g=g, dtype=dtype)
    h0 = torch.zeros(b, e, n, device="cuda") if fresh else rnd(b, e, n, g=g)
    s1, s2 = conv0.clone(), conv0.clone()
    xc1 = ck.causal_conv1d(x, w, cb, s1, "silu", fresh)
    xc2 = rf.causal_conv1d(x, w, cb, s2, "silu", fresh)
    assert_close(f"conv t={t}", xc2, xc1, RATIO[dtype])
    assert torch.equal(s1, s2)
    y1, last1 = ck.selective_scan(xc2, delta, A, B, C, D, z, bias, h0, fresh)
    y2, last2 = rf.selective_scan(xc2, delta, A, B, C, D, z, bias, h0, fresh)
    assert_close(f"selective_scan y t={t}", y2, y1, RATIO[dtype])
    assert_close(f"selective_scan state t={t}", last2, last1, RATIO[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [1, 63, 500])
def test_mamba2_prefill_ops(dtype, t):
    g = torch.Generator().manual_seed(t)
    b, h, p, gr, n = 2, 8, 64, 2, 128
    ck, rf = get_ops("cuda", "cuda"), get_ops("cuda", "ref")
    x, dt = rnd(b, t, h, p, g=g, dtype=dtype), rnd(b, t, h, g=g, dtype=dtype)
    B, C = rnd(b, t, gr, n, g=g, dtype=dtype, scale=0.3), rnd(b, t, gr, n, g=g, dtype=dtype, scale=0.3)
    A, D, bias = -torch.rand(h, generator=g).cuda() * 8, rnd(h, g=g), rnd(h, g=g, scale=0.5) - 2
    h0 = rnd(b, h, p, n, g=g)
    y1, f1 = ck.ssd(x, dt, A, B, C, 64, D, bias, (0.0, float("inf")), h0)
    y2, f2 = rf.ssd(x, dt, A, B, C, 64, D, bias, (0.0, float("inf")), h0)
    assert_close(f"ssd y t={t}", y2, y1, RATIO[dtype])
    assert_close(f"ssd state t={t}", f2, f1, RATIO[dtype])
    z = rnd(b, t, h * p, g=g, dtype=dtype)
    w = rnd(h * p, g=g, dtype=dtype)
    assert_close("gated rmsnorm", rf.gated_rmsnorm(y2.reshape(b, t, -1), z, w, 1e-5, h * p // gr, False),
                 ck.gated_rmsnorm(y2.reshape(b, t, -1), z, w, 1e-5, h * p // gr, False), RATIO[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_ops(dtype):
    g = torch.Generator().manual_seed(0)
    b, e, n, k = 3, 192, 16, 4
    ck, rf = get_ops("cuda", "cuda"), get_ops("cuda", "ref")
    conv = rnd(b, e, k, g=g, dtype=dtype)
    x, w, cb = rnd(b, e, g=g, dtype=dtype), rnd(e, k, g=g, dtype=dtype), rnd(e, g=g, dtype=dtype)
    c1, c2 = conv.clone(), conv.clone()
    assert_close("conv update", rf.causal_conv1d_update(x, c2, w, cb), ck.causal_conv1d_update(x, c1, w, cb),
                 RATIO[dtype])
    assert torch.equal(c1, c2)
    # Mamba-1 state update
    st = rnd(b, e, n, g=g, dtype=dtype)
    s1, s2 = st.clone(), st.clone()
    args = (rnd(b, e, g=g, dtype=dtype), rnd(b, e, g=g, dtype=dtype), -torch.rand(e, n, generator=g).cuda(),
            rnd(b, n, g=g, dtype=dtype), rnd(b, n, g=g, dtype=dtype), rnd(e, g=g), rnd(b, e, g=g, dtype=dtype),
            rnd(e, g=g))
    assert_close("mamba1 step y", rf.selective_state_update(s2, *args), ck.selective_state_update(s1, *args),
                 RATIO[dtype])
    assert_close("mamba1 step state", s2, s1, RATIO[dtype])
    # Mamba-2 state update (per-head values broadcast over P with stride 0, as the mixer passes them)
    h, p, gr, n2 = 8, 64, 2, 128
    st = rnd(b, h, p, n2, g=g, dtype=dtype)
    s1, s2 = st.clone(), st.clone()
    A = -torch.rand(h, generator=g).cuda()
    args = (rnd(b, h, p, g=g, dtype=dtype), rnd(b, h, g=g, dtype=dtype)[:, :, None].expand(b, h, p),
            A[:, None, None].expand(h, p, n2), rnd(b, gr, n2, g=g, dtype=dtype), rnd(b, gr, n2, g=g, dtype=dtype),
            rnd(h, g=g)[:, None].expand(h, p), None, rnd(h, g=g)[:, None].expand(h, p))
    assert_close("mamba2 step y", rf.selective_state_update(s2, *args), ck.selective_state_update(s1, *args),
                 RATIO[dtype])
    assert_close("mamba2 step state", s2, s1, RATIO[dtype])


# -- the model ------------------------------------------------------------------------------------------

def _model(kind, dtype):
    return cs.build_model(SMALL[kind], device="cuda", dtype=dtype, seed=0)


def _chunked(model, ids):
    state = model.init_state(ids.shape[0])
    t = ids.shape[1]
    parts = [model(ids[:, a:b], state)[0] for a, b in ((0, 100), (100, 237), (237, t - 3))]
    parts += [model(ids[:, i:i + 1], state)[0] for i in range(t - 3, t)]
    return torch.cat(parts, 1)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@torch.no_grad()
def test_model_cuda_backend_matches_reference(kind, dtype):
    model = _model(kind, dtype)
    ids = torch.randint(0, 1000, (2, 300), device="cuda")
    ref_logits, _ = model.set_backend("ref")(ids)
    full, _ = model.set_backend("cuda")(ids)
    assert_close(f"{kind} full forward", ref_logits, full, RATIO[dtype])
    assert_close(f"{kind} chunked prefill + steps", ref_logits, _chunked(model, ids), RATIO[dtype])


@needs_kernels
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@torch.no_grad()
def test_model_matches_mamba_ssm(kind):
    from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    model = _model(kind, torch.float32).set_backend("cuda")
    cfg, sd = to_mamba_ssm(model)
    theirs = MambaLMHeadModel(SsmConfig(**cfg), device="cuda", dtype=torch.float32).eval()
    theirs.load_state_dict(sd)
    ids = torch.randint(0, 1000, (2, 300), device="cuda")
    expected = theirs(ids).logits
    assert_close(f"{kind} vs mamba-ssm", expected, model(ids)[0], RATIO[torch.float32])
    assert_close(f"{kind} chunked vs mamba-ssm", expected, _chunked(model, ids), RATIO[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_cuda_graph_generate(kind, backend):
    model = _model(kind, torch.bfloat16).set_backend(backend)
    prompts = [torch.randint(0, 1000, (n,)).tolist() for n in (17, 5, 17, 40)]
    graphed = model.generate(prompts, max_new_tokens=24, cuda_graph=True)
    eager = model.generate(prompts, max_new_tokens=24, cuda_graph=False)
    assert graphed.tolist() == eager.tolist()


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@torch.no_grad()
def test_state_bytes_and_fork_on_cuda(kind):
    model = _model(kind, torch.bfloat16)
    state = model.init_state(2)
    n0 = state.nbytes()
    model(torch.randint(0, 1000, (2, 129), device="cuda"), state)
    fork = state.fork([1, 1, 0])
    assert state.nbytes() == n0 and fork.nbytes() == n0 // 2 * 3
    a, _ = model(torch.full((3, 1), 7, device="cuda"), fork)
    assert torch.equal(a[0], a[1])
