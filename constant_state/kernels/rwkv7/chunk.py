"""Triton chunked RWKV-7 wkv for prefill.

Per head, a chunk of ``BT`` tokens starting from state ``S0`` (``[K, V]``) is computed with matrix
products (the algorithm of :func:`rwkv7_chunk_ref`). With ``g`` the inclusive cumulative log decay in
the chunk and ``g~ = g - w`` the exclusive one::

    L_ab[t, s] = sum_j a_tj e^{g~_tj} b_sj e^{-g_sj}   (s < t)      L_ak: same with k for b
    L_rb[t, s] = sum_j r_tj e^{g_tj}  b_sj e^{-g_sj}   (s <= t)     L_rk: same with k for b
    U = (I - L_ab)^{-1} (A e^{g~} S0 + L_ak V)          (U_t = S_{t-1}^T a_t)
    O = R e^{g} S0 + L_rb U + L_rk V
    S_end = e^{g_last} S0 + (B e^{g_last - g})^T U + (K e^{g_last - g})^T V

``(I - L_ab)^{-1}`` does not depend on the state: a first kernel computes it for every chunk in
parallel, by forward substitution row by row (the product form ``(I + L)(I + L^2)(I + L^4)...`` is
cheaper but loses all precision when keys are correlated, as powers of ``L`` grow huge before
cancelling). The second kernel, one program per (V block, batch x head), walks the chunks in order
with its ``[K, BV]`` fp32 state slice in registers and writes it back in place at the end.

Range: ``e^{-g}`` must stay finite in fp32, so the summed log decay over one chunk must stay above
about -80; the model's ``w >= -exp(-0.5)`` gives at most 16 * 0.607 = 9.7 for BT = 16.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import check_inputs, contiguous

__all__ = ["chunk_rwkv7"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CHUNK = 16
"""Tokens per chunk (BT)."""
_CONFIGS = ([triton.Config({"BV": 16}, num_warps=4)] if _INTERPRET else
            [triton.Config({"BV": bv}, num_warps=nw, num_stages=ns)
             for bv, nw in ((16, 4), (32, 4), (32, 8), (64, 4), (64, 8)) for ns in (1, 2)])
# Configs that do not spill on sm_90 for bf16 inputs by ptxas -v (fp32/IEEE inputs spill some). Small
# BV: more programs per SM to hide the chunk-to-chunk dependency of the state.


@triton.jit
def _chunk_inverse_kernel(w, a, b, inv, T, H, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                          PRECISION: tl.constexpr):
    """(I - L_ab)^{-1} of every chunk, all chunks in parallel (it does not depend on the state)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_c = tl.arange(0, BT)
    t_idx = i_c * BT + o_c
    m_tk = (t_idx < T)[:, None] & (o_k < K)[None, :]
    off_k = (i_b.to(tl.int64) * T * H + i_h) * K + t_idx[:, None].to(tl.int64) * (H * K) + o_k[None, :]
    b_w = tl.load(w + off_k, mask=m_tk, other=0.0).to(tl.float32)
    b_a = tl.load(a + off_k, mask=m_tk, other=0.0).to(tl.float32)
    b_b = tl.load(b + off_k, mask=m_tk, other=0.0).to(tl.float32)
    g = tl.cumsum(b_w, axis=0)
    a_g = b_a * tl.exp(g - b_w)
    b_g = b_b * tl.exp(-g)
    l_ab = tl.where(o_c[:, None] > o_c[None, :], tl.dot(a_g, tl.trans(b_g), input_precision=PRECISION), 0.0)
    # Forward substitution, row by row (rows s < i are final): stable where the power series
    # (I + L)(I + L^2)(I + L^4)... is not (powers of L grow huge for correlated keys).
    m = tl.where(o_c[:, None] == o_c[None, :], 1.0, 0.0)
    for i in range(BT):
        sel = o_c == i
        l_i = tl.sum(tl.where(sel[:, None], l_ab, 0.0), axis=0)  # [BT] row i of L_ab
        m += tl.where(sel[:, None], tl.sum(l_i[:, None] * m, axis=0)[None, :], 0.0)
    p_inv = inv + ((i_bh.to(tl.int64) * tl.cdiv(T, BT) + i_c) * BT + o_c[:, None]) * BT + o_c[None, :]
    tl.store(p_inv, m)


# H is a runtime argument (no recompilation per head count); autotuning is still per H.
@triton.autotune(configs=_CONFIGS, key=["H", "K", "V", "PRECISION"], restore_value=["s"])
@triton.jit
def _chunk_rwkv7_kernel(r, w, k, v, a, b, o, s, inv, T, H, K: tl.constexpr, V: tl.constexpr,
                        BK: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, BT)
    m_k, m_v = o_k < K, o_v < V
    strict = o_c[:, None] > o_c[None, :]
    incl = o_c[:, None] >= o_c[None, :]
    # 64-bit offsets: B * T * H * D overflows int32 for long prefills at large batch.
    p_s = s + i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    state = tl.load(p_s, mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)  # [BK, BV]
    base_k = (i_b.to(tl.int64) * T * H + i_h) * K
    base_v = (i_b.to(tl.int64) * T * H + i_h) * V
    p_inv = inv + (i_bh.to(tl.int64) * tl.cdiv(T, BT) * BT + o_c[:, None]) * BT + o_c[None, :]
    for c in range(tl.cdiv(T, BT)):
        t_idx = c * BT + o_c
        m_t = t_idx < T
        off_k = base_k + t_idx[:, None].to(tl.int64) * (H * K) + o_k[None, :]
        off_v = base_v + t_idx[:, None].to(tl.int64) * (H * V) + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_r = tl.load(r + off_k, mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
        b_w = tl.load(w + off_k, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + off_k, mask=m_tk, other=0.0).to(tl.float32)
        b_a = tl.load(a + off_k, mask=m_tk, other=0.0).to(tl.float32)
        b_b = tl.load(b + off_k, mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + off_v, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        g = tl.cumsum(b_w, axis=0)  # [BT, BK]; padded rows add 0
        g_last = tl.sum(b_w, axis=0)  # [BK]
        r_g = b_r * tl.exp(g)
        a_g = b_a * tl.exp(g - b_w)
        e_neg = tl.exp(-g)
        b_g = b_b * e_neg
        k_g = b_k * e_neg
        l_ak = tl.where(strict, tl.dot(a_g, tl.trans(k_g), input_precision=PRECISION), 0.0)
        l_rb = tl.where(incl, tl.dot(r_g, tl.trans(b_g), input_precision=PRECISION), 0.0)
        l_rk = tl.where(incl, tl.dot(r_g, tl.trans(k_g), input_precision=PRECISION), 0.0)
        m_inv = tl.load(p_inv + c * BT * BT)  # (I - L_ab)^{-1} [BT, BT], from _chunk_inverse_kernel
        rhs = tl.dot(a_g, state, input_precision=PRECISION) + tl.dot(l_ak, b_v, input_precision=PRECISION)
        u = tl.dot(m_inv, rhs, input_precision=PRECISION)
        b_o = (tl.dot(r_g, state, input_precision=PRECISION) + tl.dot(l_rb, u, input_precision=PRECISION)
               + tl.dot(l_rk, b_v, input_precision=PRECISION))
        tl.store(o + off_v, b_o.to(o.dtype.element_ty), mask=m_tv)
        to_end = tl.exp(g_last[None, :] - g)  # [BT, BK]; e^{g_last - g} <= 1
        state = (state * tl.exp(g_last)[:, None]
                 + tl.dot(tl.trans(b_b * to_end), u, input_precision=PRECISION)
                 + tl.dot(tl.trans(b_k * to_end), b_v, input_precision=PRECISION))
    tl.store(p_s, state, mask=m_k[:, None] & m_v[None, :])


def chunk_rwkv7(r, w, k, v, a, b, state: torch.Tensor | None = None, *, inplace: bool = False):
    """Same contract as :func:`rwkv7_ref` (``w`` is the log decay); returns ``(o, final_state)``.

    With ``inplace=True`` the final state is written into ``state`` (which is returned), without a copy.
    fp32 inputs use IEEE fp32 matrix products; bf16/fp16 inputs use TF32 (fp32 accumulation).
    """
    bsz, t, h, dk, dv = check_inputs("chunk_rwkv7", r, w, k, v, a, b, state)
    if dk > 128 or dv > 128:
        raise ValueError(f"chunk_rwkv7: head sizes up to 128 supported, got K={dk}, V={dv}")
    r, w, k, v, a, b = contiguous(r, w, k, v, a, b)
    if state is None:
        s = torch.zeros(bsz, h, dk, dv, dtype=torch.float32, device=r.device)
    elif inplace:
        if not state.is_contiguous():
            raise ValueError(f"chunk_rwkv7: inplace=True needs a contiguous state, got strides {state.stride()}")
        s = state
    else:
        s = state.clone(memory_format=torch.contiguous_format)
    o = torch.empty_like(v)
    precision = "ieee" if torch.float32 in (r.dtype, k.dtype, v.dtype, a.dtype, b.dtype) else "tf32"
    bk = max(16, triton.next_power_of_2(dk))

    nt = triton.cdiv(t, CHUNK)
    inv = torch.empty(bsz * h * nt * CHUNK * CHUNK, dtype=torch.float32, device=r.device)
    _chunk_inverse_kernel[(nt, bsz * h)](w, a, b, inv, t, h, K=dk, BK=bk, BT=CHUNK, PRECISION=precision,
                                         num_warps=4)

    def grid(meta):
        return (triton.cdiv(dv, meta["BV"]), bsz * h)

    _chunk_rwkv7_kernel[grid](r, w, k, v, a, b, o, s, inv, t, h, K=dk, V=dv, BK=bk, PRECISION=precision, BT=CHUNK)
    return o, s
