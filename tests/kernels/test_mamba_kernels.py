"""Mamba Triton kernels vs their PyTorch references on small shapes.

Runs on a GPU, or on the CPU under Triton's interpreter when TRITON_INTERPRET=1 was set before
triton was imported (tests/test_mamba.py runs this file in such a subprocess). In a plain CPU
pytest process it skips: the interpreter cannot be switched on after import.
"""

import os

import pytest
import torch

from constant_state.kernels.mamba.state_correction import initial_state_correction, initial_state_correction_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 from process start, or a CUDA device")
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.mark.parametrize("b, d, t, n", [(1, 8, 5, 4), (2, 37, 70, 16), (3, 64, 129, 8)])
def test_initial_state_correction_matches_reference(b, d, t, n):
    """The output term of a non-zero initial state, odd channel and step counts (masked tiles)."""
    g = torch.Generator().manual_seed(0)
    dt = torch.nn.functional.softplus(torch.randn(b, d, t, generator=g))
    cs = dt.cumsum(-1).to(DEVICE)
    A = (-torch.rand(d, n, generator=g) * 2).to(DEVICE)
    h0 = torch.randn(b, d, n, generator=g).to(DEVICE)
    C = torch.randn(b, n, t, generator=g).to(DEVICE)
    ref = initial_state_correction_ref(cs, A, h0, C)
    out = initial_state_correction(cs, A, h0, C)
    assert out.shape == (b, d, t)
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"max abs err {err:.2e}"


def test_initial_state_correction_rejects_bad_shapes():
    cs = torch.zeros(2, 8, 5, device=DEVICE)
    with pytest.raises(ValueError, match="C \\[B, N, T\\]"):
        initial_state_correction(cs, torch.zeros(8, 4, device=DEVICE), torch.zeros(2, 8, 4, device=DEVICE),
                                 torch.zeros(2, 4, 6, device=DEVICE))
