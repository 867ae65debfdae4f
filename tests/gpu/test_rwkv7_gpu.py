"""RWKV-7 on CUDA: Triton kernels vs the fp32 reference on real shapes, the model's CUDA-graph decode,
and (when fla 0.6.0 is importable) our chunk kernel and loader against fla's."""

import pytest
import torch

import constant_state as cs
from constant_state.kernels.rwkv7 import rwkv7_chunk_ref, rwkv7_ref
from constant_state.models.rwkv7 import RWKV7Config

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons need IEEE fp32 matmuls (the rwkv package, if imported, switches TF32 on)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved

# Error bounds written once: max |err| / max |ref| (the reference sees the same rounded inputs).
RATIO = {torch.float32: 2e-4, torch.bfloat16: 1e-2}


def assert_close(name, ref, out, ratio):
    ref, out = ref.float().cpu(), out.float().cpu()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (ref - out).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    rms = ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-6)).item()
    print(f"{name}: max err ratio {err:.2e}, rms ratio {rms:.2e}")
    assert err <= ratio, f"{name}: max err ratio {err:.3e} > {ratio:.1e} (rms ratio {rms:.3e})"


def inputs(b, t, h, d, dtype, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    r, k, v = rnd(b, t, h, d), rnd(b, t, h, d) * 0.5, rnd(b, t, h, d)
    w = -0.606531 * torch.sigmoid(rnd(b, t, h, d) * 2)
    kk = torch.nn.functional.normalize(rnd(b, t, h, d), dim=-1)
    a_gate = torch.rand((b, t, h, d), generator=g)
    xs = [x.to(dtype).to(device) for x in (r, w, k, v, -kk, kk * a_gate)]
    return xs, rnd(b, h, d, d).to(device)


def reference(xs, s0):
    """fp32 reference on the CPU (independent of CUDA matmul precision settings)."""
    xs = [x.cpu() for x in xs]
    fn = rwkv7_chunk_ref if xs[0].shape[1] >= 64 else rwkv7_ref
    return fn(*xs, s0.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [1, 7, 63, 65, 500, 1000])
@pytest.mark.parametrize("kernel", ["chunk", "fused_recurrent"])
def test_kernel_vs_reference_real_shapes(kernel, t, dtype):
    from constant_state.kernels.rwkv7.chunk import chunk_rwkv7
    from constant_state.kernels.rwkv7.fused_recurrent import fused_recurrent_rwkv7

    if kernel == "fused_recurrent" and t > 500:
        pytest.skip("the token loop is for short inputs")
    fn = chunk_rwkv7 if kernel == "chunk" else fused_recurrent_rwkv7
    xs, s0 = inputs(2, t, 12, 64, dtype)
    o_ref, s_ref = reference(xs, s0)
    o, s = fn(*xs, s0.clone(), inplace=True)
    assert_close(f"{kernel} T={t} {dtype} o", o_ref, o, RATIO[dtype])
    assert_close(f"{kernel} T={t} {dtype} state", s_ref, s, RATIO[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("b,t", [(1, 1), (32, 1), (3, 17)])
def test_fused_timemix_vs_reference(b, t, dtype):
    from constant_state.kernels.rwkv7.fused_layer import fused_timemix_rwkv7
    from constant_state.kernels.rwkv7.ref import timemix_core_ref

    g = torch.Generator().manual_seed(t)
    h, n = 12, 64
    c = h * n
    rnd = lambda *s, scale=1.0: (torch.randn(s, generator=g) * scale).to(dtype)  # noqa: E731
    xs = [rnd(b, t, c) for _ in range(8)]
    ps = [rnd(c) for _ in range(7)]
    r_k = rnd(h, n, scale=0.1)
    s0 = torch.randn(b, h, n, n, generator=g)
    cpu_args = (*xs, *ps[:3], *ps[3:5], r_k, *ps[5:], 64e-5)
    s_ref = s0.clone()
    # The reference in fp32 on the CPU from the same rounded inputs.
    y_ref = timemix_core_ref(*(x.float() if isinstance(x, torch.Tensor) else x for x in cpu_args), s_ref)
    s_out = s0.cuda()
    y = fused_timemix_rwkv7(*(x.cuda() if isinstance(x, torch.Tensor) else x for x in cpu_args), s_out)
    assert_close(f"fused timemix y B={b} T={t} {dtype}", y_ref, y, RATIO[dtype])
    assert_close(f"fused timemix state B={b} T={t} {dtype}", s_ref, s_out, RATIO[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunk_kernel_correlated_keys(dtype):
    """Nearly parallel keys, slow decay, 2000 tokens: the triangular solve must stay stable."""
    from constant_state.kernels.rwkv7.chunk import chunk_rwkv7

    g = torch.Generator().manual_seed(0)
    b, t, h, d = 2, 2000, 4, 64
    r, k, v = (torch.randn(b, t, h, d, generator=g) for _ in range(3))
    w = torch.full((b, t, h, d), -1e-3)
    kk = torch.nn.functional.normalize(torch.randn(h, d, generator=g) + 0.02 * torch.randn(b, t, h, d, generator=g),
                                       dim=-1)
    xs = [x.to(dtype) for x in (r, w, k, v, -kk, 0.9 * kk)]
    o_ref, s_ref = rwkv7_chunk_ref(*xs)
    o, s = chunk_rwkv7(*(x.cuda() for x in xs))
    assert_close(f"correlated o {dtype}", o_ref, o, RATIO[dtype])
    assert_close(f"correlated state {dtype}", s_ref, s, RATIO[dtype])


def test_chunk_kernel_64bit_offsets():
    """More than 2**31 elements per input: the last row must equal that row run on its own."""
    from constant_state.kernels.rwkv7.chunk import chunk_rwkv7

    b, t, h, d = 44, 65537, 12, 64  # H = 12 reuses the autotuning of the tests above
    assert b * t * h * d > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(6)]
    xs[1] = -0.6 * torch.sigmoid(xs[1])
    xs[4] = torch.nn.functional.normalize(xs[4].float(), dim=-1).to(torch.bfloat16)
    xs[5] = -xs[4] * 0.5
    xs[2] = xs[2] * 0.1
    o, s = chunk_rwkv7(*xs)
    o_last, s_last = chunk_rwkv7(*(x[-1:].contiguous() for x in xs))
    assert torch.isfinite(o[-1]).all()
    assert torch.equal(o[-1:], o_last) and torch.equal(s[-1:], s_last)
    del xs, o, s
    torch.cuda.empty_cache()


def _tiny(dtype="float32"):
    return RWKV7Config(vocab_size=256, hidden_size=256, num_layers=3, head_size=64, decay_lora=32, a_lora=32,
                       v_lora=32, gate_lora=32, dtype=dtype)


@torch.no_grad()
def test_model_cuda_matches_cpu_prefill_and_steps():
    cpu = cs.build_model(_tiny(), dtype="float32", seed=0)
    gpu = cs.build_model(_tiny(), dtype="float32", seed=0, device="cuda")
    ids = torch.randint(0, 256, (3, 130), generator=torch.Generator().manual_seed(0))
    ref, _ = cpu(ids)
    state = gpu.init_state(3)
    parts = [gpu(ids[:, :100].cuda(), state)[0]]  # chunk kernel
    for i in range(100, 130):
        parts.append(gpu(ids[:, i:i + 1].cuda(), state)[0])  # fused recurrent kernel
    assert_close("model logits", ref, torch.cat(parts, 1), 1e-3)


@torch.no_grad()
def test_cuda_graph_generate_matches_eager_and_cpu():
    cpu = cs.build_model(_tiny(), dtype="float32", seed=1)
    gpu = cs.build_model(_tiny(), dtype="float32", seed=1, device="cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 70, 9, 3)]
    graphed, sg = gpu.generate(prompts, max_new_tokens=24, cuda_graph=True, return_state=True)
    eager, se = gpu.generate(prompts, max_new_tokens=24, cuda_graph=False, return_state=True)
    assert torch.equal(graphed, eager)
    assert sg.nbytes() == se.nbytes() == 4 * sum(s.fixed_bytes for s in gpu.state_specs())
    ref = cpu.generate(prompts, max_new_tokens=24)
    assert graphed.tolist() == ref.tolist()


@torch.no_grad()
def test_preset_shape_bf16_triton_vs_torch_backend():
    model = cs.load("rwkv7-0.1b", device="cuda", dtype="bfloat16")
    ids = torch.randint(0, 65536, (2, 300), device="cuda")
    model.set_kernel("torch")
    ref, _ = model(ids)
    model.set_kernel("auto")
    out, _ = model(ids)
    assert_close("0.1b bf16 logits", ref, out, 3e-2)


def _fla():
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
        return chunk_rwkv7
    except ImportError:
        pytest.skip("fla (flash-linear-attention 0.6.0) not importable")


@pytest.mark.parametrize("t", [63, 2048])
def test_chunk_kernel_vs_fla(t):
    from constant_state.kernels.rwkv7.chunk import chunk_rwkv7

    fla_chunk_rwkv7 = _fla()
    xs, s0 = inputs(4, t, 12, 64, torch.bfloat16)
    o_ref, s_ref = reference(xs, s0)
    o, s = chunk_rwkv7(*xs, s0)
    o_fla, s_fla = fla_chunk_rwkv7(*xs, scale=1.0, initial_state=s0.clone(), output_final_state=True)
    assert_close("fla vs ref o", o_ref, o_fla, 5e-2)  # fla's own error, for the record
    assert_close("ours vs ref o", o_ref, o, RATIO[torch.bfloat16])
    assert_close("ours vs fla o", o_fla, o, 5e-2)
    assert_close("ours vs fla state", s_fla, s, 5e-2)


@torch.no_grad()
def test_fla_hub_checkpoint_logits(tmp_path):
    """fla's RWKV7ForCausalLM saved with save_pretrained, loaded by us: same logits."""
    _fla()
    from fla.models import RWKV7Config as FlaConfig, RWKV7ForCausalLM

    torch.manual_seed(0)
    cfg = FlaConfig(hidden_size=256, num_hidden_layers=2, head_dim=64, vocab_size=300, decay_low_rank_dim=32,
                    a_low_rank_dim=32, v_low_rank_dim=32, gate_low_rank_dim=32)
    fla_model = RWKV7ForCausalLM(cfg).float().cuda().eval()
    for p in fla_model.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    fla_model.save_pretrained(tmp_path / "fla")
    ours = cs.load(str(tmp_path / "fla"), device="cuda", dtype="float32")
    ids = torch.randint(0, 300, (2, 80), device="cuda")
    ref = fla_model(ids).logits
    out, _ = ours(ids)
    assert_close("fla-hub logits", ref, out, 1e-2)
