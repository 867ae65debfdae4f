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
def _round_e4m3(y):
    """``y`` rounded to the nearest e4m3 value in fp32 (ties away from zero), so that the cast to
    fp8 is exact: the same result on every backend (Triton's interpreter misrounds across binades)."""
    e = ((y.to(tl.int32, bitcast=True) >> 23) & 255) - 127
    e = tl.maximum(e, -6)  # e4m3 subnormals share the ulp of the smallest binade
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    r = tl.floor(tl.abs(y) / ulp + 0.5) * ulp
    return tl.where(y < 0, -r, r)


@triton.jit
def _quant_store(x, codes_ptr, scale_ptr, zero_ptr, row, srow,
                 KIND: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr):
    """Quantize one head vector ``x [D]`` (fp32, unpacked byte order) and store it."""
    if KIND == 1 or KIND == 2:
        qmax = 448.0 if KIND == 1 else 127.0
        s = tl.maximum(tl.max(tl.abs(x), 0) / qmax, _MIN_SCALE).to(tl.float16)
        y = x / s.to(tl.float32)
        offs = tl.arange(0, D)
        if KIND == 1:
            c = _round_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
            c = c.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        else:
            y = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(-y + 0.5))
            c = tl.minimum(tl.maximum(y, -127.0), 127.0).to(tl.int8)
        tl.store(codes_ptr + row + offs, c)
        tl.store(scale_ptr + srow, s)
    else:
        # int4: the unpacked order keeps each group contiguous, so [D] -> [D / GROUP, GROUP].
        NG: tl.constexpr = D // GROUP
        xg = tl.reshape(x, [NG, GROUP])
        mn = tl.min(xg, 1)
        s = tl.maximum((tl.max(xg, 1) - mn) / 15.0, _MIN_SCALE).to(tl.float16)
        z = mn.to(tl.float16)
        qv = tl.floor((xg - z.to(tl.float32)[:, None]) / s.to(tl.float32)[:, None] + 0.5)
        qv = tl.minimum(tl.maximum(qv, 0.0), 15.0).to(tl.int32)
        pairs = tl.reshape(qv, [D // 2, 2])
        shift = tl.arange(0, 2) * 4
        packed = tl.sum(pairs << shift[None, :], 1).to(tl.uint8)
        tl.store(codes_ptr + row + tl.arange(0, D // 2), packed)
        g = tl.arange(0, NG)
        tl.store(scale_ptr + srow + g, s)
        tl.store(zero_ptr + srow + g, z)


@triton.jit
def _write_kernel(k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr,
                  H, stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                  KIND: tl.constexpr, P: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
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
        _quant_store(tl.load(k_ptr + src).to(tl.float32), kc_ptr, ks_ptr, kz_ptr, row, srow, KIND, D, GROUP)
        _quant_store(tl.load(v_ptr + src).to(tl.float32), vc_ptr, vs_ptr, vz_ptr, row, srow, KIND, D, GROUP)


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
        h, kc.stride(0), kc.stride(1), kc.stride(2),
        cache.k_scale.stride(0), cache.k_scale.stride(1), cache.k_scale.stride(2),
        KIND=KIND_IDS[cache.kind], P=cache.per_byte, D=d, GROUP=cache.group, BS=bs, num_warps=1,
    )
