"""Mamba Triton kernels vs their PyTorch references on small shapes.

Runs on a GPU, or on the CPU under Triton's interpreter when TRITON_INTERPRET=1 was set before
triton was imported (tests/test_mamba.py runs this file in such a subprocess). In a plain CPU
pytest process it skips: the interpreter cannot be switched on after import.
"""

import pytest
import torch
from helpers import KERNEL_DEVICE, needs_interpreter_or_cuda

from constant_state.kernels.mamba.state_correction import continue_from_state, continue_from_state_ref

pytestmark = needs_interpreter_or_cuda
DEVICE = KERNEL_DEVICE


@pytest.mark.parametrize("b, d, t, n", [(1, 8, 5, 4), (2, 37, 130, 16)])
@pytest.mark.parametrize("with_z, with_bias", [(True, True), (False, False)])
def test_continue_from_state_matches_reference(b, d, t, n, with_z, with_bias):
    """The fused continuation (softplus + running sum + output term + gate + final state) vs the
    reference, on strided dt / z views (time contiguous) and bf16 y, several time tiles."""
    g = torch.Generator().manual_seed(1)
    xz = torch.randn(2 * d, b, t, generator=g).to(DEVICE).permute(1, 0, 2)  # [B, 2D, T], strided like the model
    dt, z = xz[:, :d] * 0.5 - 1.0, (xz[:, d:] if with_z else None)
    bias = (torch.randn(d, generator=g) * 0.5).to(DEVICE) if with_bias else None
    A = (-torch.rand(d, n, generator=g) * 2).to(DEVICE)
    h0 = torch.randn(b, d, n, generator=g).to(DEVICE)
    C = torch.randn(b, n, t, generator=g).to(DEVICE)
    y = torch.randn(b, d, t, generator=g).to(DEVICE, torch.bfloat16)
    last = torch.randn(b, d, n, generator=g).to(DEVICE)
    y_ref, last_ref = continue_from_state_ref(y, last, dt, bias, A, h0, C, z)
    y_out, last_out = continue_from_state(y.clone(), last.clone(), dt, bias, A, h0, C, z)
    assert (y_out.float() - y_ref.float()).abs().max().item() <= 2e-2 * max(1.0, y_ref.float().abs().max().item())
    assert (last_out - last_ref).abs().max().item() <= 1e-5 * max(1.0, last_ref.abs().max().item())
    # y in fp32: tight
    y32 = y.float()
    y_ref32, _ = continue_from_state_ref(y32, last, dt, bias, A, h0, C, z)
    y_out32, _ = continue_from_state(y32.clone(), last.clone(), dt, bias, A, h0, C, z)
    assert (y_out32 - y_ref32).abs().max().item() <= 1e-5 * max(1.0, y_ref32.abs().max().item())
