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
