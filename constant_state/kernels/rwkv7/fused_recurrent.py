"""Triton fused recurrent RWKV-7 wkv: one token per loop step, the state held in registers.

The decode kernel (T == 1) and usable for short T. One program per (V block, batch x head); each owns a
``[K, BV]`` slice of the fp32 state, reads it once, updates it in place and writes it back, so the
state keeps its address (CUDA-graph friendly) and forked rows never alias.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_inputs, contiguous

__all__ = ["fused_recurrent_rwkv7"]


@triton.jit(do_not_specialize=["T"])
def _fused_recurrent_rwkv7_kernel(r, w, k, v, a, b, o, s, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                  BK: tl.constexpr, BV: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    # 64-bit offsets: B * T * H * D overflows int32 for long prefills at large batch.
    p_s = s + i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    state = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)  # [BK, BV]
    off_k = (i_b.to(tl.int64) * T * H + i_h) * K + o_k
    off_v = (i_b.to(tl.int64) * T * H + i_h) * V + o_v
    for _ in range(T):
        b_r = tl.load(r + off_k, mask=m_k, other=0.0).to(tl.float32)
        b_w = tl.exp(tl.load(w + off_k, mask=m_k, other=0.0).to(tl.float32))
        b_k = tl.load(k + off_k, mask=m_k, other=0.0).to(tl.float32)
        b_a = tl.load(a + off_k, mask=m_k, other=0.0).to(tl.float32)
        b_b = tl.load(b + off_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + off_v, mask=m_v, other=0.0).to(tl.float32)
        sa = tl.sum(b_a[:, None] * state, axis=0)  # [BV]
        state = state * b_w[:, None] + b_b[:, None] * sa[None, :] + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_r[:, None] * state, axis=0)  # [BV]
        tl.store(o + off_v, b_o.to(o.dtype.element_ty), mask=m_v)
        off_k += H * K
        off_v += H * V
    tl.store(p_s, state, mask=m_s)


def fused_recurrent_rwkv7(r, w, k, v, a, b, state: torch.Tensor | None = None, *, inplace: bool = False,
                          block_v: int | None = None):
    """Same contract as :func:`rwkv7_ref` (``w`` is the log decay); returns ``(o, final_state)``.

    With ``inplace=True`` the final state is written into ``state`` (which is returned), without a copy.
    """
    bsz, t, h, dk, dv = check_inputs("fused_recurrent_rwkv7", r, w, k, v, a, b, state)
    r, w, k, v, a, b = contiguous(r, w, k, v, a, b)
    if state is None:
        s = torch.zeros(bsz, h, dk, dv, dtype=torch.float32, device=r.device)
    elif inplace:
        if not state.is_contiguous():
            raise ValueError("fused_recurrent_rwkv7: inplace=True needs a contiguous state, got strides "
                             f"{state.stride()}")
        s = state
    else:
        s = state.clone(memory_format=torch.contiguous_format)
    o = torch.empty_like(v)
    bk = triton.next_power_of_2(dk)
    # Few (batch x head) rows: split V finer so that more programs share the work.
    bv = block_v or min(triton.next_power_of_2(dv), 16 if bsz * h < 256 else 32)
    grid = (triton.cdiv(dv, bv), bsz * h)
    _fused_recurrent_rwkv7_kernel[grid](r, w, k, v, a, b, o, s, t, H=h, K=dk, V=dv, BK=bk, BV=bv,
                                        num_warps=4 if bk * bv >= 2048 else 2)
    return o, s
