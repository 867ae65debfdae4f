"""Paged attention in Triton over dense or quantized blocks, dequantized in registers.

One kernel serves decode and prefill. A program owns one KV head of one row and a tile of
``BLOCK_T`` query tokens x all ``G = Hq / Hkv`` query heads of that KV head (GQA: each key tile is
read once for all its query heads), and one split of the context. Decode (``T == 1``) splits the
context so that batch 1 still fills the GPU, then :func:`_combine_splits` merges the partial
softmaxes. The split count depends only on shapes (block-table width, batch, heads), never on
``seq_lens`` values, so the launch is CUDA-graph capturable.

Formats (``KIND``): 0 dense, 1 fp8 e4m3 + fp16 scale per token and head, 2 int8 likewise, 3 int4
with fp16 scale and zero per group of ``GROUP`` dims, 4 KIVI 2-bit (keys: scale and zero per
channel and block; values: per group of ``GROUP`` dims; the newest tokens from the row's fp16
residual window). Packed codes are unpacked to ``[N, D]`` in
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
KIND_IDS = {"dense": 0, "fp8": 1, "int8": 2, "int4": 3, "kivi2": 4}


@triton.jit
def _pack_order(offs_d, P: tl.constexpr, GROUP: tl.constexpr):
    """Head-dim index of unpacked position ``offs_d`` (mirrors ``ref.pack_order``)."""
    i = offs_d // P
    j = offs_d % P
    gp = GROUP // P
    return (i // gp) * GROUP + j * gp + i % gp


@triton.jit
def _load_tile(codes_ptr, scale_ptr, zero_ptr, row, srow, mask_n, offs_d, dim,
               KIND: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """Dequantized ``[N, D]`` fp32 tile in unpacked order; ``row``/``srow`` are int64 element offsets
    of each token's head vector in the codes / scales tensors. ``PER_CHANNEL``: one scale and zero
    per head-dim channel at ``srow`` (kivi2 keys), instead of per token."""
    if KIND == 0:
        x = tl.load(codes_ptr + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
    elif KIND == 1 or KIND == 2:
        c = tl.load(codes_ptr + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0)
        if KIND == 1:
            c = c.to(tl.float8e4nv, bitcast=True)
        s = tl.load(scale_ptr + srow, mask=mask_n, other=0.0).to(tl.float32)
        x = c.to(tl.float32) * s[:, None]
    else:
        # int4 / 2-bit: byte i of the token holds unpacked positions P*i .. P*i + P - 1, low bits first.
        # Each byte / scale is loaded once and broadcast in registers (unpacked order keeps a
        # byte's values, and a group's dims, adjacent).
        P: tl.constexpr = 2 if KIND == 3 else 4
        BITS: tl.constexpr = 8 // P
        N: tl.constexpr = row.shape[0]
        offs_c = tl.arange(0, D // P)
        c = tl.load(codes_ptr + row[:, None] + offs_c[None, :], mask=mask_n[:, None], other=0).to(tl.int32)
        c = tl.reshape(tl.broadcast_to(c[:, :, None], [N, D // P, P]), [N, D])
        q = (c >> ((offs_d[None, :] % P) * BITS)) & ((1 << BITS) - 1)
        if PER_CHANNEL:
            s = tl.load(scale_ptr + srow[:, None] + dim[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + srow[:, None] + dim[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
        else:
            NG: tl.constexpr = D // GROUP
            g = tl.arange(0, NG)
            s = tl.load(scale_ptr + srow[:, None] + g[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + srow[:, None] + g[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
            s = tl.reshape(tl.broadcast_to(s[:, :, None], [N, NG, GROUP]), [N, D])
            z = tl.reshape(tl.broadcast_to(z[:, :, None], [N, NG, GROUP]), [N, D])
        x = q.to(tl.float32) * s + z
    return x


@triton.jit
def _load_kv(codes_ptr, scale_ptr, zero_ptr, res_ptr, blk, tok, offs_n, mask_n, offs_d, dim, b, h, F, R, HKV,
             stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
             KIND: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """A K or V tile ``[N, D]``: quantized blocks, and for kivi2 the row's fp16 residual window
    for the tokens at ``F`` and after."""
    row = blk * stride_cb + tok * stride_ct + h * stride_ch
    srow = blk * stride_sb + tok * stride_st + h * stride_sh
    if KIND == 4:
        in_res = offs_n >= F
        x = _load_tile(codes_ptr, scale_ptr, zero_ptr, row, srow, mask_n & (offs_n < F), offs_d, dim,
                       KIND, D, GROUP, PER_CHANNEL)
        rrow = ((b.to(tl.int64) * R + (offs_n - F)) * HKV + h) * D
        r = tl.load(res_ptr + rrow[:, None] + dim[None, :], mask=(mask_n & in_res)[:, None], other=0.0)
        x = tl.where(in_res[:, None], r.to(tl.float32), x)
    else:
        x = _load_tile(codes_ptr, scale_ptr, zero_ptr, row, srow, mask_n, offs_d, dim, KIND, D, GROUP, PER_CHANNEL)
    return x


@triton.jit
def _paged_attn_kernel(
    q_ptr, o_ptr, part_ptr, ml_ptr,
    k_ptr, v_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr, rk_ptr, rv_ptr,
    bt_ptr, seq_ptr,
    T, HQ, HKV, M, R, scale_log2,
    stride_cb, stride_ct, stride_ch,  # codes: block, token, head (elements)
    stride_kb, stride_kt, stride_kh,  # key scales / zeros: block, token, head
    stride_vb, stride_vt, stride_vh,  # value scales / zeros: block, token, head
    WINDOW, SINKS,
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
        # Skip keys before the window of the first query (not with sinks: those stay visible).
        win_lo = (seq_len - T + pid_t * BLOCK_T - WINDOW + 1) // BLOCK_N * BLOCK_N
        k_lo = tl.maximum(k_lo, tl.where(SINKS > 0, 0, win_lo))

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * M
    F = seq_len
    if KIND == 4:
        F = seq_len // R * R  # kivi2: tokens from F on sit in the residual window
    for start in range(k_lo, k_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < k_hi
        blk = tl.load(bt_row + offs_n // BS, mask=mask_n, other=0).to(tl.int64)
        tok = offs_n % BS
        k = _load_kv(k_ptr, ks_ptr, kz_ptr, rk_ptr, blk, tok, offs_n, mask_n, offs_d, dim, b, h, F, R, HKV,
                     stride_cb, stride_ct, stride_ch, stride_kb, stride_kt, stride_kh, KIND, D, GROUP, KIND == 4)
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale_log2  # [ROWS, N]
        ok = mask_n[None, :] & (offs_n[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            ok &= (offs_n[None, :] > qpos[:, None] - WINDOW) | (offs_n[None, :] < SINKS)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv(v_ptr, vs_ptr, vz_ptr, rv_ptr, blk, tok, offs_n, mask_n, offs_d, dim, b, h, F, R, HKV,
                     stride_cb, stride_ct, stride_ch, stride_vb, stride_vt, stride_vh, KIND, D, GROUP, False)
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


# (BLOCK_N, num_warps, num_stages) per (format, decode?), from sm_90 register use of the compiled
# kernels (offline, 16-byte aligned arguments): the largest tiles without spills. Packed formats
# unpack to fp32 [BLOCK_N, D] tiles and need small tiles; re-tune on the H200 with
# `benchmarks/bench_kv_decode.py --only tune`.
TILE_CONFIGS = {
    ("dense", True): (64, 4, 3), ("dense", False): (64, 4, 2),
    ("fp8", True): (64, 8, 2), ("fp8", False): (32, 4, 2),
    ("int8", True): (64, 8, 2), ("int8", False): (32, 4, 2),
    ("int4", True): (16, 8, 2), ("int4", False): (16, 8, 2),
    ("kivi2", True): (16, 8, 2), ("kivi2", False): (16, 8, 2),
}


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
                    sliding_window: int | None = None, *, num_splits: int | None = None,
                    res_k: torch.Tensor | None = None, res_v: torch.Tensor | None = None,
                    sinks: int = 0, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Triton twin of ``paged_attention_ref`` (``cache = (k_cache, v_cache)``) and of
    ``quant_paged_attention_ref`` (``cache`` a :class:`QuantKV`; kivi2 with its residual windows
    ``res_k, res_v [B, R, Hkv, D]``): ``q [B, T, Hq, D]`` -> ``[B, T, Hq, D]``. ``config``
    overrides the tile choice ``(BLOCK_N, num_warps, num_stages)`` (benchmarks/bench_kv_decode.py --only tune)."""
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
    block_n, num_warps, num_stages = (config or TILE_CONFIGS[(kind, t == 1)])
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
    if kind == "kivi2":
        if res_k is None or res_v is None or res_k.shape[0] != b:
            raise ValueError(f"kivi2 needs res_k, res_v [B={b}, R, Hkv, D]")
        r = res_k.shape[1]
        kstr = (ks.stride(0), 0, ks.stride(1))  # per channel: [N, H, D]
    else:
        res_k = res_v = k
        r = 0
        kstr = (ks.stride(0), ks.stride(1), ks.stride(2)) if kind != "dense" else (0, 0, 0)
    vstr = (vs.stride(0), vs.stride(1), vs.stride(2)) if kind != "dense" else (0, 0, 0)
    grid = (b * hkv, triton.cdiv(t, block_t), num_splits)
    _paged_attn_kernel[grid](
        q, out, part, ml, k, v, ks, vs, kz, vz, res_k, res_v, block_tables, seq_lens,
        t, hq, hkv, m, r, scale * 1.4426950408889634,
        k.stride(0), k.stride(1), k.stride(2), *kstr, *vstr,
        sliding_window or 0, sinks,
        KIND=KIND_IDS[kind], P=p, D=d, GROUP=group, BS=bs, G=gq, GPAD=gpad, BLOCK_T=block_t, BLOCK_N=block_n,
        CHUNK=chunk, SPLITS=num_splits, HAS_WINDOW=sliding_window is not None,
        DOT_F32=_INTERPRET or q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _combine_splits[(b * t * hq,)](part, ml, out, SPLITS=num_splits,
                                       SPAD=triton.next_power_of_2(num_splits), D=d, num_warps=4)
    return out
