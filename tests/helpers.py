"""Shared test helpers: tiny Hugging Face checkpoints and tolerances written once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

# Kernel tests (tests/kernels/) run on a GPU, or on the CPU under Triton's interpreter when
# TRITON_INTERPRET=1 was set before triton was imported; in a plain CPU process they skip.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"
needs_interpreter_or_cuda = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                               reason="needs TRITON_INTERPRET=1 from process start, or a CUDA device")


def run_under_interpreter(test_file: str, *pytest_args: str) -> str:
    """Run ``tests/kernels/<test_file>`` in a fresh process with TRITON_INTERPRET=1 (the interpreter
    must be chosen before triton is imported); assert it passed and return its output."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args,
                           f"tests/kernels/{test_file}"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """max |out - ref| / max |ref| <= ratio (fla's convention); prints the max and RMS ratios."""
    ref, out = ref.float().cpu(), out.float().cpu()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (ref - out).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    rms = ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-6)).item()
    print(f"{name}: max err ratio {err:.2e}, rms ratio {rms:.2e}")
    assert err <= ratio, f"{name}: max err ratio {err:.3e} > {ratio:.1e} (rms ratio {rms:.3e})"


def tiny_hf_config(model_type: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
    if model_type == "llama":
        base.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        base.update(overrides)
        return LlamaConfig(**base)
    if model_type == "mistral":
        base.update(sliding_window=24)
        base.update(overrides)
        return MistralConfig(**base)
    if model_type == "qwen2":
        base.update(tie_word_embeddings=True)
        base.update(overrides)
        return Qwen2Config(**base)
    raise ValueError(model_type)


def save_tiny_hf(tmp_path: Path, model_type: str, seed: int = 0, **overrides):
    """Write a random tiny HF checkpoint; returns (dir, hf_model in fp32 eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # Non-trivial norm weights and biases so that a mis-mapped tensor shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path / model_type
    model.save_pretrained(d)
    return d, model


def paired_serves(fmt: str, case: dict) -> bool:
    """Whether the CUDA decode kernel's paired loop serves a decode test case of ``fmt`` (``fp8`` ..
    ``int4-g32``, ``kivi2``): only then does its unpaired variant run another kernel than the default."""
    from constant_state.kernels.paged_attention import cuda_decode

    kind = fmt.split("-")[0]
    group = case.get("group", 32 if fmt.endswith("g32") else 64 if kind in ("int4", "kivi2") else case["d"])
    return bool(cuda_decode.paired_for(kind, group, case["gqa"], 0, 1))


def bulk_serves(fmt: str, case: dict) -> bool:
    """Whether the paired loop of a decode test case of ``fmt`` is fed by bulk copies (int4 in 16-token
    blocks, kivi2 in 32- and 64-token blocks: the storage's chunk layout): only then does its ``unbulked``
    variant (the paired loop's loads into registers; int4 with groups of 32: the one-tile loop) run
    another kernel than the default."""
    from constant_state.cache.formats import get_format
    from constant_state.cache.quant import kivi_name

    kind = fmt.split("-")[0]
    f = get_format(kivi_name(case.get("group", 64), case.get("residual", 128)) if kind == "kivi2" else fmt)
    return paired_serves(fmt, case) and f.kind in ("int4", "kivi2") and f.chunked(case["bs"], case["d"])


def kivi2_decode_case(lens, gqa, d, bs, group=64, residual=128, window=None, sinks=0, qdtype=torch.bfloat16,
                      hkv=2, seed=0, device="cpu", key_ramp=0.0):
    """A kivi2 decode problem: random codes and scales in every block first (masked tokens are not
    zeros), then each row written through the storage (groups of R tokens flushed into its blocks, the
    newest tokens in its fp16 residual window). Returns the ``decode.paged_attention`` arguments as a
    dict (``q, cache, block_tables, seq_lens, scale, sliding_window, sinks, res_k, res_v``) and the
    reference output on the dequantized cache. ``key_ramp``: keys scaled by ``1 + key_ramp x position``
    (scores that keep rising along the context: the running max moves often)."""
    from constant_state.cache.formats import get_format
    from constant_state.cache.quant import kivi_name
    from constant_state.kernels.paged_attention.ref import quant_paged_attention_ref

    gen = torch.Generator().manual_seed(seed)
    fmt = get_format(kivi_name(group, residual))
    b, m = len(lens), -(-max(lens) // bs) + 1
    n = b * m + 5
    st = fmt.make_storage(n, bs, hkv, d, device)
    c = st.cache
    for x in (c.k, c.v):
        x.copy_(torch.randint(0, 256, x.shape, generator=gen))
    for x in (c.k_scale, c.v_scale):
        x.copy_(torch.rand(x.shape, generator=gen) * 0.5 + 0.05)
    for x in (c.k_zero, c.v_zero):
        x.copy_(torch.randn(x.shape, generator=gen))
    rows = fmt.row_tensors(b, hkv, d, device)
    res_k, res_v = rows["res_k"], rows["res_v"]
    bt = torch.randperm(n, generator=gen)[:b * m].view(b, m).int().to(device)
    for i, length in enumerate(lens):
        k, v = (torch.randn(1, length, hkv, d, generator=gen).to(device) for _ in range(2))
        k = k * (1 + key_ramp * torch.arange(length, device=device))[None, :, None, None]
        slots = (bt[i:i + 1].long()[:, :, None] * bs + torch.arange(bs, device=device)).view(1, -1)[:, :length]
        st.write(k, v, slots, seq_lens=torch.tensor([length], device=device), block_tables=bt[i:i + 1],
                 res_k=res_k[i:i + 1], res_v=res_v[i:i + 1])
    q = torch.randn(b, 1, hkv * gqa, d, generator=gen).to(device, qdtype)
    seq = torch.tensor(lens, dtype=torch.int32, device=device)
    args = dict(q=q, cache=c, block_tables=bt, seq_lens=seq, scale=d ** -0.5, sliding_window=window, sinks=sinks,
                res_k=res_k, res_v=res_v)
    ref = quant_paged_attention_ref(q.float(), c, bt, seq, d ** -0.5, window, res_k, res_v, sinks=sinks)
    return args, ref


# kivi2 decode cases of the CUDA kernel (emulated on the CPU, and on the GPU): blocks of 32 or 64 tokens.
KIVI2_DECODE_CASES = [
    dict(lens=[300, 65, 128], gqa=4, d=128, bs=32),  # 44 residual tokens; only residual ones; none
    dict(lens=[300, 65, 128], gqa=4, d=128, bs=32, qdtype=torch.float16),
    dict(lens=[500, 200], gqa=8, d=64, bs=64, group=32, num_splits=5),
    dict(lens=[600, 97], gqa=2, d=128, bs=32, group=128, residual=64, window=100, sinks=4),
    dict(lens=[600, 270], gqa=5, d=128, bs=32, group=32, window=200),
    dict(lens=[40], gqa=1, d=64, bs=32, num_splits=1, hkv=1),
    dict(lens=[1000], gqa=4, d=128, bs=64, num_splits=3),
    dict(lens=[700, 97, 64], gqa=2, d=128, bs=64, group=128, residual=64, window=150, sinks=4),
    dict(lens=[450, 200], gqa=4, d=64, bs=64, group=32, qdtype=torch.float16),
]
KIVI2_DECODE_IDS = ["residual-mixes", "fp16-queries", "d64-g32-splits5", "g128-r64-sinks-window",
                    "g32-gqa5-window", "residual-only-mha", "bs64-splits3", "bs64-g128-r64-sinks-window",
                    "bs64-d64-g32-fp16-queries"]
