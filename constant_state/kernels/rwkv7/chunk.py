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
parallel. Default (``inverse="blocked"``): block doubling. With ``X_n`` the inverse of the block-diagonal
part of ``I - L`` in blocks of ``n`` and ``E_n`` the part of ``L`` in the lower-left ``n x n`` block of each
``2n`` block, ``X_2n = X_n + X_n E_n X_n`` (exact, as ``(X_n E_n)^2 = 0``): ``X_2 = I + E_1`` is read off
``L``, then log2(BT) - 1 levels of two fp32 (IEEE) ``BT x BT`` products. Every level produces exact
blocks of the inverse, so no intermediate grows beyond the inverse itself. The product form
``(I + L)(I + L^2)(I + L^4)...`` is cheaper but loses all precision when keys are correlated (powers of
``L`` grow huge before cancelling). One warp per program at BT = 16 (no waiting on other warps), several chunks of one
(batch x head) per program (:func:`inverse_launch`). The first version (``inverse="rows"``, kept for
A/B comparisons): forward substitution row by row, one 4-warp program per chunk; its row extractions
are cross-warp reductions, about a hundred barriers per chunk. The second kernel, one program per
(V block, batch x head), walks the chunks in order with its ``[K, BV]`` fp32 state slice in registers
and writes it back in place at the end.

Range: ``e^{-g}`` must stay finite in fp32, so the summed log decay over one chunk must stay above
about -80; the model's ``w >= -exp(-0.5)`` gives at most 16 * 0.607 = 9.7 for BT = 16 (19.4 for BT = 32).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import check_inputs, contiguous

__all__ = ["chunk_rwkv7", "chunk_inverses", "INVERSES"]

CHUNK = 16
"""Default tokens per chunk (BT); ``chunk_size`` 32 is also supported."""
CHUNK_SIZES = (16, 32)
INVERSES = ("blocked", "rows")
"""How the per-chunk ``(I - L_ab)^{-1}`` is computed: block doubling, several chunks per one-warp program
(the default), or the first version's row-by-row forward substitution, one chunk per program."""
MAX_CHUNKS_PER_PROGRAM = 8


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_config(device: torch.device, programs_per_block: int, dv: int) -> tuple[int, ...]:
    """(BV, num_warps, num_stages[, maxnreg]) of the scan kernel (no autotuning: one compilation per
    dtype and head size, nothing to re-tune per shape, CUDA-graph safe).

    Measured on the H200 at 32 x 2048, 12 heads of 64, bf16 (``bench_rwkv7.py --chunk-only``, with the
    blocked inverse): BV = 64, 4 warps, 1 stage, registers capped at 168 (3 programs per SM: the 384
    programs in one wave instead of two; some spills) 1.126 ms = 58.2 M tok/s; uncapped 1.44 ms; 2 stages
    capped 1.21 ms. Earlier sweep (``--sweep``): BV = 32 and 16 slower, 8 warps and BT = 32 slower
    throughout. A smaller BV repeats the state-independent work of a chunk (exponentials, the three
    ``L`` products) once per V block, so the widest block wins once there are enough (batch x head)
    rows to fill the GPU; with fewer, narrower blocks spread the scan over more SMs.
    """
    if device.type != "cuda":
        return 16, 4, 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs_per_block * triton.cdiv(dv, 64) >= sms:
        return 64, 4, 1, 168
    if programs_per_block * triton.cdiv(dv, 32) >= sms:
        return 32, 4, 1
    return 16, 4, 1


def inverse_launch(device: torch.device, chunks: int, chunk_size: int) -> tuple[int, int]:
    """(chunks per program, num_warps) of the blocked inverse kernel for ``chunks`` chunks in all.

    Up to 8 chunks per program while that leaves >= 32 programs per SM (the launch overhead and the
    index math amortised, the grid still several waves deep); one warp at BT = 16 (a 16 x 16 tile
    needs no more, and one warp needs no barriers); four at BT = 32 (one warp would spill).
    """
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    nc = max(1, min(MAX_CHUNKS_PER_PROGRAM, chunks // (sms * 32)))
    return nc, (1 if chunk_size <= 16 else 4)


@triton.jit(do_not_specialize=["T", "H", "NC"])
def _chunk_inverse_blocked_kernel(w, a, b, inv, T, H, NC, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                                  LOG2BT: tl.constexpr, PRECISION: tl.constexpr):
    """(I - L_ab)^{-1} of chunks ``NC * program_id(0)`` .. ``+ NC - 1`` of one (batch x head), by block doubling.

    With ``X_n`` the inverse of the block-diagonal part of ``I - L`` (blocks of ``n``) and ``E_n`` the
    part of ``L`` in the lower-left ``n x n`` block of each ``2n`` block, ``X_2n = X_n + X_n E_n X_n``
    (exact: ``(X_n E_n)^2 = 0``). ``X_2 = I + E_1`` is read off ``L``; then log2(BT) - 1 levels of two
    fp32 (IEEE) products. Every level yields exact blocks of the inverse, so nothing grows beyond the
    inverse itself (unlike the power series). One warp per program (BT = 16): no waiting on other warps.
    """
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    nt = tl.cdiv(T, BT)
    o_k = tl.arange(0, BK)
    o_c = tl.arange(0, BT)
    m_k = o_k < K
    rows, cols = o_c[:, None], o_c[None, :]
    strict = rows > cols
    base = (i_b.to(tl.int64) * T * H + i_h) * K
    c0 = i_p * NC
    for i_c in range(c0, tl.minimum(c0 + NC, nt)):
        t_idx = i_c * BT + o_c
        m_tk = (t_idx < T)[:, None] & m_k[None, :]
        off_k = base + t_idx[:, None].to(tl.int64) * (H * K) + o_k[None, :]
        # log2 units: exp2 has no denormal fix-up around MUFU.EX2 (exp does), and the values are
        # the same up to rounding (tl.exp is exp2 of x * log2(e)).
        b_w = tl.load(w + off_k, mask=m_tk, other=0.0).to(tl.float32) * 1.4426950408889634
        b_a = tl.load(a + off_k, mask=m_tk, other=0.0).to(tl.float32)
        b_b = tl.load(b + off_k, mask=m_tk, other=0.0).to(tl.float32)
        g = tl.cumsum(b_w, axis=0)
        a_g = b_a * tl.exp2(g - b_w)
        b_g = b_b * tl.exp2(-g)
        l_ab = tl.where(strict, tl.dot(a_g, tl.trans(b_g), input_precision=PRECISION), 0.0)
        x = tl.where(rows == cols, 1.0, tl.where(rows // 2 == cols // 2, l_ab, 0.0))
        for lvl in tl.static_range(1, LOG2BT):
            n = 1 << lvl
            e = tl.where((rows // (2 * n) == cols // (2 * n)) & (rows // n != cols // n), l_ab, 0.0)
            x = x + tl.dot(x, tl.dot(e, x, input_precision="ieee"), input_precision="ieee")
        p_inv = inv + ((i_bh.to(tl.int64) * nt + i_c) * BT + rows) * BT + cols
        tl.store(p_inv, x)


@triton.jit(do_not_specialize=["T", "H"])
def _chunk_inverse_kernel(w, a, b, inv, T, H, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                          PRECISION: tl.constexpr):
    """(I - L_ab)^{-1} of one chunk by forward substitution, row by row (``inverse="rows"``: the first
    version, kept for comparison; ``_chunk_inverse_blocked_kernel`` is the default)."""
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


# T and H are runtime arguments, not specialised: one compilation per dtype, head size and config.
@triton.jit(do_not_specialize=["T", "H"])
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


def chunk_inverses(w, a, b, chunk_size: int = CHUNK, *, inverse: str = "blocked", precision: str = "tf32",
                   chunks_per_program: int | None = None, num_stages: int = 1) -> torch.Tensor:
    """``(I - L_ab)^{-1}`` of every chunk, ``[B * H, ceil(T / chunk_size), chunk_size, chunk_size]`` fp32.

    ``w, a, b``: ``[B, T, H, K]`` contiguous. The first launch of :func:`chunk_rwkv7`, exposed for the
    tests and the benchmark; ``chunks_per_program`` overrides :func:`inverse_launch` and ``num_stages``
    pipelines the loads of the chunk loop (blocked only; 1 by default: it has not been measured).
    """
    if inverse not in INVERSES:
        raise ValueError(f"chunk_rwkv7: inverse expected one of {INVERSES}, got {inverse!r}")
    bsz, t, h, dk = w.shape
    bt = chunk_size
    nt = triton.cdiv(t, bt)
    bk = max(16, triton.next_power_of_2(dk))
    inv = torch.empty(bsz * h, nt, bt, bt, dtype=torch.float32, device=w.device)
    if inverse == "rows":
        _chunk_inverse_kernel[(nt, bsz * h)](w, a, b, inv, t, h, K=dk, BK=bk, BT=bt, PRECISION=precision,
                                             num_warps=4)
        return inv
    nc, num_warps = inverse_launch(w.device, bsz * h * nt, bt)
    nc = chunks_per_program or nc
    _chunk_inverse_blocked_kernel[(triton.cdiv(nt, nc), bsz * h)](
        w, a, b, inv, t, h, nc, K=dk, BK=bk, BT=bt, LOG2BT=bt.bit_length() - 1, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages)
    return inv


def chunk_rwkv7(r, w, k, v, a, b, state: torch.Tensor | None = None, *, inplace: bool = False,
                chunk_size: int = CHUNK, config: tuple[int, ...] | None = None, inverse: str = "blocked"):
    """Same contract as :func:`rwkv7_ref` (``w`` is the log decay); returns ``(o, final_state)``.

    With ``inplace=True`` the final state is written into ``state`` (which is returned), without a copy.
    fp32 inputs use IEEE fp32 matrix products; bf16/fp16 inputs use TF32 (fp32 accumulation).
    ``chunk_size`` (16 or 32) and ``config = (BV, num_warps, num_stages[, maxnreg])`` of the scan kernel
    are for tuning (``benchmarks/bench_rwkv7.py --sweep``); the default is :func:`default_config`.
    ``inverse`` (one of :data:`INVERSES`) picks the kernel of the per-chunk inverses (A/B comparisons).
    """
    bsz, t, h, dk, dv = check_inputs("chunk_rwkv7", r, w, k, v, a, b, state)
    if dk > 128 or dv > 128:
        raise ValueError(f"chunk_rwkv7: head sizes up to 128 supported, got K={dk}, V={dv}")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_rwkv7: chunk_size expected one of {CHUNK_SIZES}, got {chunk_size}")
    if inverse not in INVERSES:
        raise ValueError(f"chunk_rwkv7: inverse expected one of {INVERSES}, got {inverse!r}")
    cfg = tuple(config or default_config(r.device, bsz * h, dv))
    if len(cfg) not in (3, 4):
        raise ValueError(f"chunk_rwkv7: config expected (BV, num_warps, num_stages[, maxnreg]), got {cfg}")
    bv, num_warps, num_stages = cfg[:3]
    extra = {"maxnreg": cfg[3]} if len(cfg) == 4 and cfg[3] else {}
    if bv < 16 or bv & (bv - 1):
        raise ValueError(f"chunk_rwkv7: config BV expected a power of two >= 16, got {bv}")
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
    bv = min(bv, max(16, triton.next_power_of_2(dv)))
    bt = chunk_size
    inv = chunk_inverses(w, a, b, bt, inverse=inverse, precision=precision)
    _chunk_rwkv7_kernel[(triton.cdiv(dv, bv), bsz * h)](r, w, k, v, a, b, o, s, inv, t, h, K=dk, V=dv, BK=bk,
                                                         PRECISION=precision, BT=bt, BV=bv, num_warps=num_warps,
                                                         num_stages=num_stages, **extra)
    return o, s
