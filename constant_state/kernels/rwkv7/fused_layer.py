"""Triton: RWKV-7's whole time-mix core for short inputs (decode) in one kernel.

Everything between the projections and the output projection (the twin of
:func:`timemix_core_ref`): decay, in-context rate, kk normalisation, k update, value residual, the
wkv recurrence, the per-head GroupNorm, the r_k bonus and the gate. One program per (batch, head)
holds the head's ``[N, N]`` fp32 state in registers and loops over the tokens; it replaces some
twenty elementwise launches per layer in a decode step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ref import DECAY_SCALE

__all__ = ["fused_timemix_rwkv7"]


@triton.jit(do_not_specialize=["T"])
def _fused_timemix_kernel(r, k, v, w_lo, a_lo, v_lo, v_first, g, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, y, s,
                          T, eps, H: tl.constexpr, N: tl.constexpr, BN: tl.constexpr, HAS_V_LO: tl.constexpr,
                          DECAY: tl.constexpr):
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    m_s = m_n[:, None] & m_n[None, :]
    p_s = s + i_bh.to(tl.int64) * N * N + o_n[:, None] * N + o_n[None, :]
    state = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)  # [BN (key), BN (value)]
    ch = i_h * N + o_n  # channels of this head
    p_w0 = tl.load(w0 + ch, mask=m_n, other=0.0).to(tl.float32)
    p_a0 = tl.load(a0 + ch, mask=m_n, other=0.0).to(tl.float32)
    p_kk = tl.load(k_k + ch, mask=m_n, other=0.0).to(tl.float32)
    p_ka = tl.load(k_a + ch, mask=m_n, other=0.0).to(tl.float32)
    p_rk = tl.load(r_k + ch, mask=m_n, other=0.0).to(tl.float32)
    p_lw = tl.load(ln_w + ch, mask=m_n, other=0.0).to(tl.float32)
    p_lb = tl.load(ln_b + ch, mask=m_n, other=0.0).to(tl.float32)
    if HAS_V_LO:
        p_v0 = tl.load(v0 + ch, mask=m_n, other=0.0).to(tl.float32)
    off = i_b.to(tl.int64) * T * H * N + ch  # [B, T, C] rows, 64-bit
    for _ in range(T):
        b_r = tl.load(r + off, mask=m_n, other=0.0).to(tl.float32)
        b_k = tl.load(k + off, mask=m_n, other=0.0).to(tl.float32)
        b_v = tl.load(v + off, mask=m_n, other=0.0).to(tl.float32)
        b_g = tl.load(g + off, mask=m_n, other=0.0).to(tl.float32)
        b_wl = tl.load(w_lo + off, mask=m_n, other=0.0).to(tl.float32)
        b_al = tl.load(a_lo + off, mask=m_n, other=0.0).to(tl.float32)
        decay = tl.exp(-DECAY * tl.sigmoid(p_w0 + b_wl))
        b_a = tl.sigmoid(p_a0 + b_al)
        kk = b_k * p_kk
        kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, axis=0)), 1e-12)
        b_k = b_k * (1 + (b_a - 1) * p_ka)
        if HAS_V_LO:
            b_vl = tl.load(v_lo + off, mask=m_n, other=0.0).to(tl.float32)
            b_vf = tl.load(v_first + off, mask=m_n, other=0.0).to(tl.float32)
            b_v = b_v + (b_vf - b_v) * tl.sigmoid(p_v0 + b_vl)
        sa = tl.sum(-kk[:, None] * state, axis=0)  # [BN] = (a^T S), a = -kk
        state = state * decay[:, None] + (kk * b_a)[:, None] * sa[None, :] + b_k[:, None] * b_v[None, :]
        o = tl.sum(b_r[:, None] * state, axis=0)  # [BN]
        mean = tl.sum(o, axis=0) / N
        diff = tl.where(m_n, o - mean, 0.0)
        var = tl.sum(diff * diff, axis=0) / N
        o = diff / tl.sqrt(var + eps) * p_lw + p_lb
        bonus = tl.sum(b_r * b_k * p_rk, axis=0) * b_v
        tl.store(y + off, ((o + bonus) * b_g).to(y.dtype.element_ty), mask=m_n)
        off += H * N
    tl.store(p_s, state, mask=m_s)


def fused_timemix_rwkv7(r, k, v, w_lo, a_lo, v_lo, v_first, g, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, eps: float,
                        state: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`timemix_core_ref` (``state`` updated in place); returns ``[B, T, C]``."""
    bsz, t, c = r.shape
    if r_k.dim() != 2 or r_k.shape[0] * r_k.shape[1] != c:
        raise ValueError(f"fused_timemix_rwkv7: r_k expected [H, N] with H * N = {c}, got {tuple(r_k.shape)}")
    h, n = r_k.shape
    for name, x in (("k", k), ("v", v), ("w_lo", w_lo), ("a_lo", a_lo), ("g", g)) + (
            (("v_lo", v_lo), ("v_first", v_first)) if v_lo is not None else ()):
        if tuple(x.shape) != (bsz, t, c):
            raise ValueError(f"fused_timemix_rwkv7: {name} shape expected {(bsz, t, c)}, got {tuple(x.shape)}")
    for name, x in (("w0", w0), ("a0", a0), ("k_k", k_k), ("k_a", k_a), ("ln_w", ln_w), ("ln_b", ln_b)):
        if x.numel() != c:
            raise ValueError(f"fused_timemix_rwkv7: {name} expected {c} elements, got {x.numel()}")
    if tuple(state.shape) != (bsz, h, n, n) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"fused_timemix_rwkv7: state expected contiguous float32 {(bsz, h, n, n)}, got "
                         f"{state.dtype} {tuple(state.shape)} contiguous={state.is_contiguous()}")
    has_v = v_lo is not None
    r, k, v, w_lo, a_lo, g = (x.contiguous() for x in (r, k, v, w_lo, a_lo, g))
    if has_v:
        v_lo, v_first = v_lo.contiguous(), v_first.contiguous()
    else:
        v_lo = v_first = r  # unused
        v0 = w0
    y = torch.empty_like(r)
    _fused_timemix_kernel[(bsz * h,)](r, k, v, w_lo, a_lo, v_lo, v_first, g, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b,
                                      y, state, t, eps, H=h, N=n, BN=triton.next_power_of_2(n), HAS_V_LO=has_v,
                                      DECAY=DECAY_SCALE, num_warps=8)  # 4 warps spill registers on sm_90
    return y


@triton.jit(do_not_specialize=["rows"])
def _prep_kernel(k, v, w_lo, a_lo, v_lo, v_first, w0, a0, v0, k_k, k_a, log_w, k_out, v_out, a_out, b_out, rows,
                 C: tl.constexpr, N: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, HAS_V_LO: tl.constexpr,
                 DECAY: tl.constexpr):
    # rows = B * T * H head-rows of N channels; channel c = (row % H) * N + n.
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_n = tl.arange(0, BN)
    m = (o_r < rows)[:, None] & (o_n < N)[None, :]
    off = o_r[:, None] * N + o_n[None, :]  # [BR, BN] flat, 64-bit
    ch = off % C
    b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
    b_a = tl.sigmoid(tl.load(a0 + ch, mask=m, other=0.0).to(tl.float32)
                     + tl.load(a_lo + off, mask=m, other=0.0).to(tl.float32))
    wz = tl.load(w0 + ch, mask=m, other=0.0).to(tl.float32) + tl.load(w_lo + off, mask=m, other=0.0).to(tl.float32)
    tl.store(log_w + off, -DECAY * tl.sigmoid(wz), mask=m)
    kk = b_k * tl.load(k_k + ch, mask=m, other=0.0).to(tl.float32)
    kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, axis=1)), 1e-12)[:, None]
    tl.store(a_out + off, (-kk).to(a_out.dtype.element_ty), mask=m)
    tl.store(b_out + off, (kk * b_a).to(b_out.dtype.element_ty), mask=m)
    b_k = b_k * (1 + (b_a - 1) * tl.load(k_a + ch, mask=m, other=0.0).to(tl.float32))
    tl.store(k_out + off, b_k.to(k_out.dtype.element_ty), mask=m)
    if HAS_V_LO:
        b_v = tl.load(v + off, mask=m, other=0.0).to(tl.float32)
        gate = tl.sigmoid(tl.load(v0 + ch, mask=m, other=0.0).to(tl.float32)
                          + tl.load(v_lo + off, mask=m, other=0.0).to(tl.float32))
        b_v = b_v + (tl.load(v_first + off, mask=m, other=0.0).to(tl.float32) - b_v) * gate
        tl.store(v_out + off, b_v.to(v_out.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["rows"])
def _out_kernel(o, r, k, v, g, r_k, ln_w, ln_b, y, rows, eps, C: tl.constexpr, N: tl.constexpr, BN: tl.constexpr,
                BR: tl.constexpr):
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    m = (o_r < rows)[:, None] & m_n[None, :]
    off = o_r[:, None] * N + o_n[None, :]
    ch = off % C
    b_o = tl.load(o + off, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(b_o, axis=1) / N
    diff = tl.where(m_n[None, :], b_o - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / N
    b_o = diff / tl.sqrt(var + eps)[:, None] * tl.load(ln_w + ch, mask=m, other=0.0).to(tl.float32) \
        + tl.load(ln_b + ch, mask=m, other=0.0).to(tl.float32)
    b_r = tl.load(r + off, mask=m, other=0.0).to(tl.float32)
    b_k = tl.load(k + off, mask=m, other=0.0).to(tl.float32)
    rk = tl.sum(b_r * b_k * tl.load(r_k + ch, mask=m, other=0.0).to(tl.float32), axis=1)  # [BR]
    b_v = tl.load(v + off, mask=m, other=0.0).to(tl.float32)
    b_g = tl.load(g + off, mask=m, other=0.0).to(tl.float32)
    tl.store(y + off, ((b_o + rk[:, None] * b_v) * b_g).to(y.dtype.element_ty), mask=m)


def timemix_chunked_rwkv7(r, k, v, w_lo, a_lo, v_lo, v_first, g, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, eps: float,
                          state: torch.Tensor, wkv) -> torch.Tensor:
    """The time-mix core for long inputs: a fused elementwise prologue, ``wkv`` (the chunked kernel,
    updating ``state`` in place), a fused GroupNorm/bonus/gate epilogue. Same contract as
    :func:`timemix_core_ref`."""
    bsz, t, c = r.shape
    h, n = r_k.shape
    has_v = v_lo is not None
    r, k, v, w_lo, a_lo, g = (x.contiguous() for x in (r, k, v, w_lo, a_lo, g))
    if has_v:
        v_lo, v_first = v_lo.contiguous(), v_first.contiguous()
        v_out = torch.empty_like(v)
    else:
        v_lo = v_first = v_out = v
        v0 = w0
    rows = bsz * t * h
    log_w = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    k_out, a_out, b_out = torch.empty_like(k), torch.empty_like(k), torch.empty_like(k)
    bn = triton.next_power_of_2(n)
    br = max(1, 2048 // bn)
    grid = (triton.cdiv(rows, br),)
    _prep_kernel[grid](k, v, w_lo, a_lo, v_lo, v_first, w0, a0, v0, k_k, k_a, log_w, k_out, v_out, a_out, b_out,
                       rows, C=c, N=n, BN=bn, BR=br, HAS_V_LO=has_v, DECAY=DECAY_SCALE, num_warps=4)
    shape = (bsz, t, h, n)
    o = wkv(r.view(shape), log_w.view(shape), k_out.view(shape), v_out.view(shape), a_out.view(shape),
            b_out.view(shape), state)
    y = torch.empty_like(r)
    _out_kernel[grid](o.contiguous(), r, k_out, v_out, g, r_k, ln_w, ln_b, y, rows, eps, C=c, N=n, BN=bn, BR=br,
                      num_warps=4)
    return y
