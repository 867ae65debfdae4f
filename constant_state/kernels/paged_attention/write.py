"""Quantize-and-write of new keys and values into their paged blocks (prefill and decode alike).

One program per (new token, KV head) quantizes K and V of that head with the same formulas as
``ref.quant_write_ref`` (fp16 scales rounded before use, round-half-away-from-zero) and stores the
codes, scales and zero points at the token's slot. Slots ``< 0`` are skipped (padding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import KIND_IDS, _pack_order
from .ref import MIN_SCALE, QuantKV

_MIN_SCALE = tl.constexpr(MIN_SCALE)


@triton.jit
def _div(a, b):
    """IEEE-rounded ``a / b`` (Triton's ``/`` on fp32 is an approximate division on the GPU; torch's
    is correctly rounded, and a 1-ulp difference flips a code at a rounding boundary)."""
    return tl.math.div_rn(a, b + tl.zeros_like(a))


@triton.jit
def _round_e4m3(y):
    """``y`` rounded to the nearest e4m3 value in fp32 (ties away from zero), so that the cast to
    fp8 is exact: the same result on every backend (Triton's interpreter misrounds across binades)."""
    e = ((y.to(tl.int32, bitcast=True) >> 23) & 255) - 127
    e = tl.maximum(e, -6)  # e4m3 subnormals share the ulp of the smallest binade
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    r = tl.floor(_div(tl.abs(y), ulp) + 0.5) * ulp
    return tl.where(y < 0, -r, r)


@triton.jit
def _quant_store(x, codes_ptr, scale_ptr, zero_ptr, row, srow, cstride,
                 KIND: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr):
    """Quantize one head vector ``x [D]`` (fp32, unpacked byte order) and store it (its bytes
    ``cstride`` apart: 1 for keys, the block size for token-contiguous values)."""
    if KIND == 1 or KIND == 2:
        qmax = 448.0 if KIND == 1 else 127.0
        s = tl.maximum(_div(tl.max(tl.abs(x), 0), qmax), _MIN_SCALE).to(tl.float16)
        y = _div(x, s.to(tl.float32))
        offs = tl.arange(0, D)
        if KIND == 1:
            c = _round_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
            c = c.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        else:
            y = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(-y + 0.5))
            c = tl.minimum(tl.maximum(y, -127.0), 127.0).to(tl.int8)
        tl.store(codes_ptr + row + offs * cstride, c)
        tl.store(scale_ptr + srow, s)
    else:
        # int4: the unpacked order keeps each group contiguous, so [D] -> [D / GROUP, GROUP].
        NG: tl.constexpr = D // GROUP
        xg = tl.reshape(x, [NG, GROUP])
        mn = tl.min(xg, 1)
        s = tl.maximum(_div(tl.max(xg, 1) - mn, 15.0), _MIN_SCALE).to(tl.float16)
        z = mn.to(tl.float16)
        qv = tl.floor(_div(xg - z.to(tl.float32)[:, None], s.to(tl.float32)[:, None]) + 0.5)
        qv = tl.minimum(tl.maximum(qv, 0.0), 15.0).to(tl.int32)
        pairs = tl.reshape(qv, [D // 2, 2])
        shift = tl.arange(0, 2) * 4
        packed = tl.sum(pairs << shift[None, :], 1).to(tl.uint8)
        tl.store(codes_ptr + row + tl.arange(0, D // 2) * cstride, packed)
        g = tl.arange(0, NG)
        tl.store(scale_ptr + srow + g, s)
        tl.store(zero_ptr + srow + g, z)


@triton.jit
def _write_kernel(k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr,
                  H, stride_cb, stride_ct, stride_ch, stride_wb, stride_wt, stride_wh, stride_wc,
                  stride_sb, stride_st, stride_sh, KIND: tl.constexpr, P: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
                  BS: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        dim = _pack_order(tl.arange(0, D), P, GROUP)
        src = (tok * H + h) * D + dim
        blk = slot // BS
        t = slot % BS
        row = blk * stride_cb + t * stride_ct + h * stride_ch
        srow = blk * stride_sb + t * stride_st + h * stride_sh
        vrow = blk * stride_wb + t * stride_wt + h * stride_wh
        _quant_store(tl.load(k_ptr + src).to(tl.float32), kc_ptr, ks_ptr, kz_ptr, row, srow, 1, KIND, D, GROUP)
        _quant_store(tl.load(v_ptr + src).to(tl.float32), vc_ptr, vs_ptr, vz_ptr, vrow, srow, stride_wc, KIND, D,
                     GROUP)


def quant_write(cache: QuantKV, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Triton twin of ``ref.quant_write_ref``: ``k, v [B, T, Hkv, D]`` at ``slot_mapping [B, T]``."""
    if k.shape != v.shape or k.dim() != 4 or k.shape[:2] != slot_mapping.shape:
        raise ValueError(f"k, v must be [B, T, Hkv, D] matching slot_mapping [B, T]; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(slot_mapping.shape)}")
    b, t, h, d = k.shape
    kc, vc = cache.k, cache.v
    if cache.kind == "fp8":
        kc, vc = kc.view(torch.uint8), vc.view(torch.uint8)
    kz = cache.k_zero if cache.k_zero is not None else cache.k_scale
    vz = cache.v_zero if cache.v_zero is not None else cache.v_scale
    bs = kc.shape[1]
    _write_kernel[(b * t, h)](
        k.contiguous(), v.contiguous(), slot_mapping.contiguous(), kc, vc, cache.k_scale, cache.v_scale, kz, vz,
        h, kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2), vc.stride(3),
        cache.k_scale.stride(0), cache.k_scale.stride(1), cache.k_scale.stride(2),
        KIND=KIND_IDS[cache.kind], P=cache.per_byte, D=d, GROUP=cache.group, BS=bs, num_warps=1,
    )


@triton.jit
def _pack2(q, ROWS: tl.constexpr, D: tl.constexpr):
    """2-bit codes ``[ROWS, D]`` (int32, unpacked order) -> bytes ``[ROWS, D / 4]``."""
    quads = tl.reshape(q, [ROWS, D // 4, 4])
    shift = tl.arange(0, 4) * 2
    return tl.sum(quads << shift[None, None, :], 2).to(tl.uint8)


@triton.jit
def _kivi_flush_kernel(wk_ptr, wv_ptr, seq_ptr, bt_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
                       T, L, H, M, R,
                       stride_cb, stride_ct, stride_ch, stride_wb, stride_wt, stride_wh, stride_wc,
                       stride_vb, stride_vt, stride_vh, stride_kb, stride_kh,
                       D: tl.constexpr, GROUP: tl.constexpr, BS: tl.constexpr):
    """One block of one head of one row's open-group window: quantize and store it if its group of
    ``R`` tokens is complete (keys per channel over the block, values per token and group)."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    h = tl.program_id(2)
    n1 = tl.load(seq_ptr + b)
    f0 = (n1 - T) // R * R
    if f0 + (j * BS // R + 1) * R <= n1:
        blk = tl.load(bt_ptr + b.to(tl.int64) * M + (f0 + j * BS) // BS).to(tl.int64)
        offs_d = tl.arange(0, D)
        dim = _pack_order(offs_d, 4, GROUP)
        tok = tl.arange(0, BS)
        src = ((b.to(tl.int64) * L + j * BS + tok[:, None]) * H + h) * D + dim[None, :]
        row = blk * stride_cb + tok * stride_ct + h * stride_ch
        # Keys: scale and zero per channel over the block's BS tokens.
        x = tl.load(wk_ptr + src)
        mn = tl.min(x, 0)
        s = tl.maximum(_div(tl.max(x, 0) - mn, 3.0), _MIN_SCALE).to(tl.float16)
        z = mn.to(tl.float16)
        q = tl.floor(_div(x - z.to(tl.float32)[None, :], s.to(tl.float32)[None, :]) + 0.5)
        q = tl.minimum(tl.maximum(q, 0.0), 3.0).to(tl.int32)
        tl.store(kc_ptr + row[:, None] + tl.arange(0, D // 4)[None, :], _pack2(q, BS, D))
        tl.store(ks_ptr + blk * stride_kb + h * stride_kh + dim, s)
        tl.store(kz_ptr + blk * stride_kb + h * stride_kh + dim, z)
        # Values: scale and zero per token and group of GROUP dims (contiguous in unpacked order).
        NG: tl.constexpr = D // GROUP
        xv = tl.reshape(tl.load(wv_ptr + src), [BS, NG, GROUP])
        mnv = tl.min(xv, 2)
        sv = tl.maximum(_div(tl.max(xv, 2) - mnv, 3.0), _MIN_SCALE).to(tl.float16)
        zv = mnv.to(tl.float16)
        qv = tl.floor(_div(xv - zv.to(tl.float32)[:, :, None], sv.to(tl.float32)[:, :, None]) + 0.5)
        qv = tl.reshape(tl.minimum(tl.maximum(qv, 0.0), 3.0).to(tl.int32), [BS, D])
        vrow = blk * stride_wb + tok * stride_wt + h * stride_wh
        tl.store(vc_ptr + vrow[:, None] + tl.arange(0, D // 4)[None, :] * stride_wc, _pack2(qv, BS, D))
        srow = blk * stride_vb + tok * stride_vt + h * stride_vh
        g = tl.arange(0, NG)
        tl.store(vs_ptr + srow[:, None] + g[None, :], sv)
        tl.store(vz_ptr + srow[:, None] + g[None, :], zv)


def kivi_flush(cache: QuantKV, wk: torch.Tensor, wv: torch.Tensor, seq_lens: torch.Tensor,
               block_tables: torch.Tensor, t: int) -> None:
    """Quantize and store every group of ``R`` tokens completed by a write of ``t`` tokens; ``wk, wv
    [B, L, H, D]`` fp32 are the open-group windows of ``ref.kivi_window`` (the flush loop of
    ``ref.kivi_write_ref``, with completeness decided on the device)."""
    b, L, h, d = wk.shape
    bs = cache.k.shape[1]
    vs = cache.v_scale
    _kivi_flush_kernel[(b, L // bs, h)](
        wk.contiguous(), wv.contiguous(), seq_lens.to(torch.int32).contiguous(),
        block_tables.to(torch.int32).contiguous(), cache.k, cache.v, cache.k_scale, cache.k_zero, vs, cache.v_zero,
        t, L, h, block_tables.shape[1], cache.residual,
        cache.k.stride(0), cache.k.stride(1), cache.k.stride(2),
        cache.v.stride(0), cache.v.stride(1), cache.v.stride(2), cache.v.stride(3), vs.stride(0), vs.stride(1), vs.stride(2),
        cache.k_scale.stride(0), cache.k_scale.stride(1),
        D=d, GROUP=cache.group, BS=bs, num_warps=4,
    )
