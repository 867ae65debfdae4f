"""Input validation shared by the RWKV-7 kernel wrappers."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_inputs(name: str, r, w, k, v, a, b, state) -> tuple[int, int, int, int, int]:
    """Validate ``[B, T, H, K]`` inputs (``v``: ``[B, T, H, V]``) and a ``[B, H, K, V]`` fp32 state.

    Returns ``(B, T, H, K, V)``; raises ``ValueError``/``TypeError`` naming expected and actual values.
    """
    for n, x in (("r", r), ("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: {n} must be a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name}: {n} must be [B, T, H, D], expected 4 dims, got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: {n} dtype expected one of {FLOAT_DTYPES}, got {x.dtype}")
        if x.device != r.device:
            raise ValueError(f"{name}: {n} on device {x.device}, expected {r.device} (the device of r)")
    bsz, t, h, dk = r.shape
    dv = v.shape[-1]
    for n, x in (("w", w), ("k", k), ("a", a), ("b", b)):
        if tuple(x.shape) != (bsz, t, h, dk):
            raise ValueError(f"{name}: {n} shape expected {(bsz, t, h, dk)} (that of r), got {tuple(x.shape)}")
    if tuple(v.shape[:3]) != (bsz, t, h):
        raise ValueError(f"{name}: v shape expected {(bsz, t, h, 'V')}, got {tuple(v.shape)}")
    if t < 1:
        raise ValueError(f"{name}: expected at least one token, got T={t}")
    if state is not None:
        if tuple(state.shape) != (bsz, h, dk, dv):
            raise ValueError(f"{name}: state shape expected {(bsz, h, dk, dv)} ([B, H, K, V]), "
                             f"got {tuple(state.shape)}")
        if state.dtype != torch.float32:
            raise ValueError(f"{name}: state dtype expected torch.float32, got {state.dtype}")
        if state.device != r.device:
            raise ValueError(f"{name}: state on device {state.device}, expected {r.device}")
    return bsz, t, h, dk, dv


def contiguous(*xs: torch.Tensor):
    return tuple(x if x.is_contiguous() else x.contiguous() for x in xs)
