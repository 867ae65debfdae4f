"""Paged attention in Triton over dense or quantized blocks, dequantized in registers.

One kernel serves decode and prefill. A program owns one KV head of one row and a tile of
``BLOCK_T`` query tokens x all ``G = Hq / Hkv`` query heads of that KV head (GQA: each key tile is
read once for all its query heads), and one split of the context. Decode (``T == 1``) splits the
context so that batch 1 still fills the GPU, then :func:`_combine_splits` merges the partial
softmaxes. The split count depends only on shapes (block-table width, batch, heads), never on
``seq_lens`` values, so the launch is CUDA-graph capturable.

Formats (``KIND``): 0 dense, 1 fp8 e4m3 + fp16 scale per token and head, 2 int8 likewise, 3 int4
with fp16 scale and zero per group of ``GROUP`` dims. Packed codes are unpacked to ``[N, D]`` in
byte order (see ``ref.pack_order``); queries are loaded and outputs stored through that order.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .ref import QuantKV

# Triton's interpreter computes bf16 tl.dot wrongly; there the dots run in fp32.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KIND_IDS = {"dense": 0, "fp8": 1, "int8": 2, "int4": 3}


@triton.jit
def _pack_order(offs_d, P: tl.constexpr, GROUP: tl.constexpr):
    """Head-dim index of unpacked position ``offs_d`` (mirrors ``ref.pack_order``)."""
    i = offs_d // P
    j = offs_d % P
    gp = GROUP // P
    return (i // gp) * GROUP + j * gp + i % gp


@triton.jit
def _load_tile(codes_ptr, scale_ptr, zero_ptr, row, srow, mask_n, offs_d,
               KIND: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr):
    """Dequantized ``[N, D]`` fp32 tile; ``row``/``srow`` are int64 element offsets of each token's
    head vector in the codes / scales tensors."""
    if KIND == 0:
        x = tl.load(codes_ptr + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
    elif KIND == 1 or KIND == 2:
        c = tl.load(codes_ptr + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0)
        if KIND == 1:
            c = c.to(tl.float8e4nv, bitcast=True)
        s = tl.load(scale_ptr + srow, mask=mask_n, other=0.0).to(tl.float32)
        x = c.to(tl.float32) * s[:, None]
    else:
        # int4: byte i of the token holds unpacked positions 2i (low nibble) and 2i + 1.
        c = tl.load(codes_ptr + row[:, None] + offs_d[None, :] // 2, mask=mask_n[:, None], other=0).to(tl.int32)
        q = (c >> ((offs_d[None, :] % 2) * 4)) & 15
        g = offs_d // GROUP
        s = tl.load(scale_ptr + srow[:, None] + g[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + srow[:, None] + g[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
        x = q.to(tl.float32) * s + z
    return x


@triton.jit
def _paged_attn_kernel(
    q_ptr, o_ptr, part_ptr, ml_ptr,
    k_ptr, v_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr,
    bt_ptr, seq_ptr,
    T, HQ, HKV, M, scale_log2,
    stride_cb, stride_ct, stride_ch,  # codes: block, token, head (elements)
    stride_sb, stride_st, stride_sh,  # scales / zeros: block, token, head
    WINDOW,
    KIND: tl.constexpr, P: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, BS: tl.constexpr,
    G: tl.constexpr, GPAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV
    seq_len = tl.load(seq_ptr + b)

    ROWS: tl.constexpr = BLOCK_T * GPAD
    r = tl.arange(0, ROWS)
    t = pid_t * BLOCK_T + r // GPAD  # query token within this call
    g = r % GPAD
    row_ok = (t < T) & (g < G)
    qpos = seq_len - T + t  # absolute position of each query row
    offs_d = tl.arange(0, D)
    dim = _pack_order(offs_d, P, GROUP)  # head-dim index of each unpacked position

    # Query rows [ROWS, D] in unpacked order; int64 offsets throughout.
    q_row = ((b.to(tl.int64) * T + t) * HQ + h * G + g) * D
    q = tl.load(q_ptr + q_row[:, None] + dim[None, :], mask=row_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    # Keys this program may need: causal end of its last query, window start of its first.
    t_last = tl.minimum(pid_t * BLOCK_T + BLOCK_T, T)
    k_hi = tl.minimum(seq_len - T + t_last, (pid_s + 1) * CHUNK)
    k_lo = pid_s * CHUNK
    if HAS_WINDOW:
        k_lo = tl.maximum(k_lo, (seq_len - T + pid_t * BLOCK_T - WINDOW + 1) // BLOCK_N * BLOCK_N)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * M
    for start in range(k_lo, k_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < k_hi
        blk = tl.load(bt_row + offs_n // BS, mask=mask_n, other=0).to(tl.int64)
        tok = offs_n % BS
        row = blk * stride_cb + tok * stride_ct + h * stride_ch
        srow = blk * stride_sb + tok * stride_st + h * stride_sh
        k = _load_tile(k_ptr, ks_ptr, kz_ptr, row, srow, mask_n, offs_d, KIND, D, GROUP)
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale_log2  # [ROWS, N]
        ok = mask_n[None, :] & (offs_n[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            ok &= offs_n[None, :] > qpos[:, None] - WINDOW
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptr, vs_ptr, vz_ptr, row, srow, mask_n, offs_d, KIND, D, GROUP)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_row = (b.to(tl.int64) * T + t) * HQ + h * G + g  # [ROWS] flat (b, t, head)
    if SPLITS == 1:
        tl.store(o_ptr + o_row[:, None] * D + dim[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = o_row * SPLITS + pid_s
        tl.store(part_ptr + part[:, None] * D + dim[None, :], out, mask=row_ok[:, None])
        tl.store(ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_splits(part_ptr, ml_ptr, o_ptr, SPLITS: tl.constexpr, SPAD: tl.constexpr, D: tl.constexpr):
    """Merge the per-split softmaxes of one (row, token, head): weights ``l_s * 2^(m_s - max m)``."""
    pid = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPAD)
    ok = offs_s < SPLITS
    m = tl.load(ml_ptr + (pid * SPLITS + offs_s) * 2, mask=ok, other=float("-inf"))
    l = tl.load(ml_ptr + (pid * SPLITS + offs_s) * 2 + 1, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(l > 0, l * tl.exp2(m - m_max), 0.0)
    offs_d = tl.arange(0, D)
    o = tl.load(part_ptr + (pid * SPLITS + offs_s)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(o_ptr + pid * D + offs_d, out.to(o_ptr.dtype.element_ty))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _cache_args(cache: QuantKV | tuple[torch.Tensor, torch.Tensor]):
    """(kind, P, GROUP, codes/scale/zero tensors) of a dense ``(k, v)`` pair or a :class:`QuantKV`."""
    if isinstance(cache, QuantKV):
        k, v = cache.k, cache.v
        if cache.kind == "fp8":
            k, v = k.view(torch.uint8), v.view(torch.uint8)
        zk = cache.k_zero if cache.k_zero is not None else cache.k_scale
        zv = cache.v_zero if cache.v_zero is not None else cache.v_scale
        return cache.kind, cache.per_byte, cache.group, (k, v, cache.k_scale, cache.v_scale, zk, zv)
    k, v = cache
    return "dense", 1, k.shape[-1], (k, v, k, v, k, v)


def paged_attention(q: torch.Tensor, cache, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                    sliding_window: int | None = None, *, num_splits: int | None = None) -> torch.Tensor:
    """Triton twin of ``paged_attention_ref`` (``cache = (k_cache, v_cache)``) and of
    ``quant_paged_attention_ref`` (``cache`` a :class:`QuantKV`): ``q [B, T, Hq, D]`` -> ``[B, T, Hq, D]``."""
    kind, p, group, (k, v, ks, vs, kz, vz) = _cache_args(cache)
    b, t, hq, d = q.shape
    n, bs, hkv = k.shape[:3]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if block_tables.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(f"block_tables [B, M] / seq_lens [B] expected B={b}, got {tuple(block_tables.shape)} / "
                         f"{tuple(seq_lens.shape)}")
    for x in (k, v, ks, vs):
        if not x.is_contiguous():
            raise ValueError("cache tensors must be contiguous")
    q = q.contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    m = block_tables.shape[1]
    gq = hq // hkv
    gpad = max(triton.next_power_of_2(gq), 1)
    if t == 1:
        block_t = 1
        gpad = max(gpad, 16)  # tl.dot needs 16 rows
    else:
        block_t = max(16 // gpad, 64 // gpad, 1)
    block_n = 128 if kind == "int4" else 64
    n_tiles = triton.cdiv(m * bs, block_n)
    if num_splits is None:
        # Static: enough programs for ~2 waves of SMs at any batch, from shapes only.
        num_splits = 1 if t > 1 else max(1, min(n_tiles, triton.cdiv(2 * _num_sms(q.device), b * hkv)))
    chunk = triton.cdiv(n_tiles, num_splits) * block_n
    num_splits = triton.cdiv(m * bs, chunk)
    out = torch.empty_like(q)
    if num_splits > 1:
        part = torch.empty((b * t * hq * num_splits, d), dtype=torch.float32, device=q.device)
        ml = torch.empty((b * t * hq * num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part = ml = out
    sb, st, sh = (ks.stride(0), ks.stride(1), ks.stride(2)) if kind != "dense" else (0, 0, 0)
    grid = (b * hkv, triton.cdiv(t, block_t), num_splits)
    _paged_attn_kernel[grid](
        q, out, part, ml, k, v, ks, vs, kz, vz, block_tables, seq_lens,
        t, hq, hkv, m, scale * 1.4426950408889634,
        k.stride(0), k.stride(1), k.stride(2), sb, st, sh,
        sliding_window or 0,
        KIND=KIND_IDS[kind], P=p, D=d, GROUP=group, BS=bs, G=gq, GPAD=gpad, BLOCK_T=block_t, BLOCK_N=block_n,
        CHUNK=chunk, SPLITS=num_splits, HAS_WINDOW=sliding_window is not None,
        DOT_F32=_INTERPRET or q.dtype == torch.float32,
        num_warps=4, num_stages=3,
    )
    if num_splits > 1:
        _combine_splits[(b * t * hq,)](part, ml, out, SPLITS=num_splits,
                                       SPAD=triton.next_power_of_2(num_splits), D=d, num_warps=4)
    return out
