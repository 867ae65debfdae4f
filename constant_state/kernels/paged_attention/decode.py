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

import functools
import os

import torch
import triton
import triton.language as tl

from .ref import QuantKV, is_head_major, is_token_contiguous

# Triton's interpreter computes bf16 tl.dot wrongly; there the dots run in fp32.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KIND_IDS = {"dense": 0, "fp8": 1, "int8": 2, "int4": 3, "kivi2": 4}


@triton.jit
def _pack_order(offs_d, P: tl.constexpr, GROUP: tl.constexpr):
    """Head-dim index of unpacked position ``offs_d`` (mirrors ``ref.pack_order``)."""
    i = offs_d // P
    j = offs_d % P
    if P == 4:  # bytes 1 and 2 of each 4-byte word swapped (ref.swap_bytes12)
        i = (i & ~3) | ((i & 1) << 1) | ((i >> 1) & 1)
    gp = GROUP // P
    return (i // gp) * GROUP + j * gp + i % gp


@triton.jit
def _slot_dims(j: tl.constexpr, P: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr):
    """Head-dim index of value slot ``j`` of each byte: ``[D / P]`` (dense / 8-bit: ``arange(D)``)."""
    return _pack_order(tl.arange(0, D // P) * P + j, P, GROUP)


@triton.jit
def _nibbles(c, j: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """Codes of value slot ``j`` of bytes ``c`` (int16, zero-extended) as exact ``DT`` numbers:
    fp16 bit trick ``0x6400 | code`` = 1024 + code (no int->float conversion instruction)."""
    v = (c >> (BITS * j)) & ((1 << BITS) - 1)
    f = (v | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    return f.to(DT)


@triton.jit
def _group_bcast(ptr, srow, mask_n, offs_c, NG: tl.constexpr, GP: tl.constexpr, DT: tl.constexpr):
    """Per-token group scales (or zeros) ``[N, NG]`` at ``ptr + srow`` broadcast to the byte columns
    ``[N, D / P]`` (byte ``i`` belongs to group ``i // GP``), by selects (no reshape/relayout)."""
    x = tl.load(ptr + srow, mask=mask_n, other=0.0).to(DT)[:, None]
    grp = (offs_c // GP)[None, :]
    for g in tl.static_range(1, NG):
        xg = tl.load(ptr + srow + g, mask=mask_n, other=0.0).to(DT)[:, None]
        x = tl.where(grp == g, xg, x)
    return x


@triton.jit
def _softmax_step(s, ok, m_i, l_i):
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _paged_attn_kernel(
    q_ptr, o_ptr, part_ptr, ml_ptr,
    k_ptr, v_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr, rk_ptr, rv_ptr,
    bt_ptr, seq_ptr,
    T, HQ, HKV, M, R, scale_log2,
    stride_cb, stride_ct, stride_ch,  # key codes: block, token, head (elements; unit stride along the head dim)
    stride_wb, stride_wt, stride_wh, stride_wc,  # value codes: block, token, head, byte
    stride_kb, stride_kt, stride_kh,  # key scales / zeros: block, token, head
    stride_vb, stride_vt, stride_vh,  # value scales / zeros: block, token, head
    WINDOW, SINKS, G, CHUNK, SPLITS,  # G, CHUNK, SPLITS at run time: fewer compiled variants
    KIND: tl.constexpr, P: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, BS: tl.constexpr,
    GPAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr, Q8_BF16: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV
    seq_len = tl.load(seq_ptr + b)

    # Dot operand type: bf16/fp16 caches in their query dtype; quantized codes are exact in fp16
    # (fp8 e4m3, int8, 4- and 2-bit integers), so those dots run in fp16 (fp32 in the interpreter).
    # Q8_BF16 (8-bit formats): codes converted to the query dtype (exact for e4m3 and int8 in
    # bf16 and fp16), the value scale folded into the probabilities (p * s_v) before the dot.
    if DOT_F32:
        DT: tl.constexpr = tl.float32
    elif KIND == 0 or ((KIND == 1 or KIND == 2) and Q8_BF16):
        DT: tl.constexpr = q_ptr.dtype.element_ty
    else:
        DT: tl.constexpr = tl.float16
    # fp32 caches / queries: exact fp32 dots (Triton's default for fp32 operands is tf32).
    PREC: tl.constexpr = "ieee" if DOT_F32 else "tf32"
    BITS: tl.constexpr = 8 // P
    DP: tl.constexpr = D // P  # values per slot: byte j of a token holds slot 0..P-1 values
    NG: tl.constexpr = D // GROUP
    GP: tl.constexpr = GROUP // P  # bytes per group

    ROWS: tl.constexpr = BLOCK_T * GPAD
    r = tl.arange(0, ROWS)
    t = pid_t * BLOCK_T + r // GPAD  # query token within this call
    g = r % GPAD
    row_ok = (t < T) & (g < G)
    qpos = seq_len - T + t  # absolute position of each query row
    offs_c = tl.arange(0, DP)  # byte (or element) column within a token's head vector

    # Query rows, one [ROWS, D / P] operand per value slot (packed formats: the dot over the head
    # dim is split into P dots over the slots, so codes are never interleaved); int64 offsets.
    q_row = ((b.to(tl.int64) * T + t) * HQ + h * G + g) * D
    dim0 = _slot_dims(0, P, D, GROUP)
    q0 = tl.load(q_ptr + q_row[:, None] + dim0[None, :], mask=row_ok[:, None], other=0.0).to(DT)
    acc0 = tl.zeros([ROWS, DP], tl.float32)
    if P >= 2:
        dim1 = _slot_dims(1, P, D, GROUP)
        q1 = tl.load(q_ptr + q_row[:, None] + dim1[None, :], mask=row_ok[:, None], other=0.0).to(DT)
        acc1 = tl.zeros([ROWS, DP], tl.float32)
    if P == 4:
        dim2 = _slot_dims(2, P, D, GROUP)
        dim3 = _slot_dims(3, P, D, GROUP)
        q2 = tl.load(q_ptr + q_row[:, None] + dim2[None, :], mask=row_ok[:, None], other=0.0).to(DT)
        q3 = tl.load(q_ptr + q_row[:, None] + dim3[None, :], mask=row_ok[:, None], other=0.0).to(DT)
        acc2 = tl.zeros([ROWS, DP], tl.float32)
        acc3 = tl.zeros([ROWS, DP], tl.float32)

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
    bt_row = bt_ptr + b.to(tl.int64) * M
    q_hi = k_hi
    if KIND == 4:
        F = seq_len // R * R  # kivi2: tokens from F on sit in the residual window
        q_hi = tl.minimum(k_hi, F)
    for start in range(k_lo, q_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < q_hi
        blk = tl.load(bt_row + offs_n // BS, mask=mask_n, other=0).to(tl.int64)
        tok = offs_n % BS
        row = blk * stride_cb + tok * stride_ct + h * stride_ch
        ksrow = blk * stride_kb + tok * stride_kt + h * stride_kh
        vsrow = blk * stride_vb + tok * stride_vt + h * stride_vh
        ok = mask_n[None, :] & (offs_n[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            ok &= (offs_n[None, :] > qpos[:, None] - WINDOW) | (offs_n[None, :] < SINKS)
        cptr = row[:, None] + offs_c[None, :]
        vptr = (blk * stride_wb + tok * stride_wt + h * stride_wh)[:, None] + offs_c[None, :] * stride_wc
        # ---- scores [ROWS, N] ----
        if KIND == 0:
            k = tl.load(k_ptr + cptr, mask=mask_n[:, None], other=0.0).to(DT)
            s = tl.dot(q0, tl.trans(k), input_precision=PREC) * scale_log2
        elif KIND == 1 or KIND == 2:
            # 8-bit: the per-token scale multiplies the scores after the dot.
            kc = tl.load(k_ptr + cptr, mask=mask_n[:, None], other=0)
            if KIND == 1 and Q8_BF16:
                k = kc.to(tl.float8e4nv, bitcast=True).to(DT)
            elif KIND == 2 and Q8_BF16:
                k = kc.to(DT)
            elif KIND == 1:
                k = kc.to(tl.float8e4nv, bitcast=True).to(tl.float16).to(DT)
            else:
                k = ((kc.to(tl.int16) & 0xFF) ^ 0x6480).to(tl.float16, bitcast=True) - 1152.0
                k = k.to(DT)
            ksc = tl.load(ks_ptr + ksrow, mask=mask_n, other=0.0).to(tl.float32) * scale_log2
            s = tl.dot(q0, tl.trans(k), input_precision=PREC) * ksc[None, :]
        elif KIND == 3:
            kc = tl.load(k_ptr + cptr, mask=mask_n[:, None], other=0).to(tl.int16)
            sc = _group_bcast(ks_ptr, ksrow, mask_n, offs_c, NG, GP, DT)
            zc = _group_bcast(kz_ptr, ksrow, mask_n, offs_c, NG, GP, DT)
            s = tl.dot(q0, tl.trans(_nibbles(kc, 0, BITS, DT) * sc + zc), input_precision=PREC)
            s += tl.dot(q1, tl.trans(_nibbles(kc, 1, BITS, DT) * sc + zc), input_precision=PREC)
            s = s * scale_log2
        else:
            # kivi2 keys: scale and zero per channel and block.
            kc = tl.load(k_ptr + cptr, mask=mask_n[:, None], other=0).to(tl.int16)
            if BLOCK_N <= BS:
                # The tile lies in one block: fold the channel scales into the queries and the
                # zero points into one per-row constant (q . z).
                blk0 = tl.load(bt_row + start // BS).to(tl.int64)
                sb = ks_ptr + blk0 * stride_kb + h * stride_kh
                zb = kz_ptr + blk0 * stride_kb + h * stride_kh
                s0 = tl.load(sb + dim0).to(DT)
                s1 = tl.load(sb + dim1).to(DT)
                s2 = tl.load(sb + dim2).to(DT)
                s3 = tl.load(sb + dim3).to(DT)
                zt = tl.sum(q0.to(tl.float32) * tl.load(zb + dim0).to(tl.float32)[None, :], 1)
                zt += tl.sum(q1.to(tl.float32) * tl.load(zb + dim1).to(tl.float32)[None, :], 1)
                zt += tl.sum(q2.to(tl.float32) * tl.load(zb + dim2).to(tl.float32)[None, :], 1)
                zt += tl.sum(q3.to(tl.float32) * tl.load(zb + dim3).to(tl.float32)[None, :], 1)
                s = tl.dot((q0 * s0[None, :]).to(DT), tl.trans(_nibbles(kc, 0, BITS, DT)), input_precision=PREC)
                s += tl.dot((q1 * s1[None, :]).to(DT), tl.trans(_nibbles(kc, 1, BITS, DT)), input_precision=PREC)
                s += tl.dot((q2 * s2[None, :]).to(DT), tl.trans(_nibbles(kc, 2, BITS, DT)), input_precision=PREC)
                s += tl.dot((q3 * s3[None, :]).to(DT), tl.trans(_nibbles(kc, 3, BITS, DT)), input_precision=PREC)
                s = (s + zt[:, None]) * scale_log2
            else:
                sb = ks_ptr + ksrow[:, None]
                zb = kz_ptr + ksrow[:, None]
                m2 = mask_n[:, None]
                x = _nibbles(kc, 0, BITS, DT) * tl.load(sb + dim0[None, :], mask=m2, other=0.0).to(DT)
                s = tl.dot(q0, tl.trans(x + tl.load(zb + dim0[None, :], mask=m2, other=0.0).to(DT)), input_precision=PREC)
                x = _nibbles(kc, 1, BITS, DT) * tl.load(sb + dim1[None, :], mask=m2, other=0.0).to(DT)
                s += tl.dot(q1, tl.trans(x + tl.load(zb + dim1[None, :], mask=m2, other=0.0).to(DT)), input_precision=PREC)
                x = _nibbles(kc, 2, BITS, DT) * tl.load(sb + dim2[None, :], mask=m2, other=0.0).to(DT)
                s += tl.dot(q2, tl.trans(x + tl.load(zb + dim2[None, :], mask=m2, other=0.0).to(DT)), input_precision=PREC)
                x = _nibbles(kc, 3, BITS, DT) * tl.load(sb + dim3[None, :], mask=m2, other=0.0).to(DT)
                s += tl.dot(q3, tl.trans(x + tl.load(zb + dim3[None, :], mask=m2, other=0.0).to(DT)), input_precision=PREC)
                s = s * scale_log2
        p, alpha, m_i, l_i = _softmax_step(s, ok, m_i, l_i)
        pd = p.to(DT)
        # ---- values ----
        if KIND == 0:
            v = tl.load(v_ptr + vptr, mask=mask_n[:, None], other=0.0).to(DT)
            acc0 = acc0 * alpha[:, None] + tl.dot(pd, v, input_precision=PREC)
        elif KIND == 1 or KIND == 2:
            vc = tl.load(v_ptr + vptr, mask=mask_n[:, None], other=0)
            if Q8_BF16:
                vsc = tl.load(vs_ptr + vsrow, mask=mask_n, other=0.0).to(tl.float32)
                if KIND == 1:
                    v = vc.to(tl.float8e4nv, bitcast=True).to(DT)
                else:
                    v = vc.to(DT)
                acc0 = acc0 * alpha[:, None] + tl.dot((p * vsc[None, :]).to(DT), v, input_precision=PREC)
            else:
                vsc = tl.load(vs_ptr + vsrow, mask=mask_n, other=0.0).to(DT)
            if KIND == 1 and not Q8_BF16:
                v = vc.to(tl.float8e4nv, bitcast=True).to(tl.float16).to(DT)
            elif not Q8_BF16:
                v = (((vc.to(tl.int16) & 0xFF) ^ 0x6480).to(tl.float16, bitcast=True) - 1152.0).to(DT)
            if not Q8_BF16:
                acc0 = acc0 * alpha[:, None] + tl.dot(pd, v * vsc[:, None], input_precision=PREC)
        else:
            # int4 and kivi2 values: scale and zero per token and group of GROUP dims.
            vc = tl.load(v_ptr + vptr, mask=mask_n[:, None], other=0).to(tl.int16)
            sc = _group_bcast(vs_ptr, vsrow, mask_n, offs_c, NG, GP, DT)
            zc = _group_bcast(vz_ptr, vsrow, mask_n, offs_c, NG, GP, DT)
            acc0 = acc0 * alpha[:, None] + tl.dot(pd, _nibbles(vc, 0, BITS, DT) * sc + zc, input_precision=PREC)
            acc1 = acc1 * alpha[:, None] + tl.dot(pd, _nibbles(vc, 1, BITS, DT) * sc + zc, input_precision=PREC)
            if P == 4:
                acc2 = acc2 * alpha[:, None] + tl.dot(pd, _nibbles(vc, 2, BITS, DT) * sc + zc, input_precision=PREC)
                acc3 = acc3 * alpha[:, None] + tl.dot(pd, _nibbles(vc, 3, BITS, DT) * sc + zc, input_precision=PREC)

    if KIND == 4:
        # kivi2: the row's newest tokens [F, seq_len) from its fp16 residual window [B, R, Hkv, D].
        for start in range(tl.maximum(k_lo, F), k_hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < k_hi
            ok = mask_n[None, :] & (offs_n[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                ok &= (offs_n[None, :] > qpos[:, None] - WINDOW) | (offs_n[None, :] < SINKS)
            rrow = ((b.to(tl.int64) * R + (offs_n - F)) * HKV + h) * D
            m2 = mask_n[:, None]
            rk = rk_ptr + rrow[:, None]
            s = tl.dot(q0, tl.trans(tl.load(rk + dim0[None, :], mask=m2, other=0.0).to(DT)), input_precision=PREC)
            s += tl.dot(q1, tl.trans(tl.load(rk + dim1[None, :], mask=m2, other=0.0).to(DT)), input_precision=PREC)
            s += tl.dot(q2, tl.trans(tl.load(rk + dim2[None, :], mask=m2, other=0.0).to(DT)), input_precision=PREC)
            s += tl.dot(q3, tl.trans(tl.load(rk + dim3[None, :], mask=m2, other=0.0).to(DT)), input_precision=PREC)
            p, alpha, m_i, l_i = _softmax_step(s * scale_log2, ok, m_i, l_i)
            pd = p.to(DT)
            rv = rv_ptr + rrow[:, None]
            acc0 = acc0 * alpha[:, None] + tl.dot(pd, tl.load(rv + dim0[None, :], mask=m2, other=0.0).to(DT), input_precision=PREC)
            acc1 = acc1 * alpha[:, None] + tl.dot(pd, tl.load(rv + dim1[None, :], mask=m2, other=0.0).to(DT), input_precision=PREC)
            acc2 = acc2 * alpha[:, None] + tl.dot(pd, tl.load(rv + dim2[None, :], mask=m2, other=0.0).to(DT), input_precision=PREC)
            acc3 = acc3 * alpha[:, None] + tl.dot(pd, tl.load(rv + dim3[None, :], mask=m2, other=0.0).to(DT), input_precision=PREC)

    inv = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    o_row = (b.to(tl.int64) * T + t) * HQ + h * G + g  # [ROWS] flat (b, t, head)
    if not SPLIT:
        optr = o_ptr + o_row[:, None] * D
        oty = o_ptr.dtype.element_ty
        tl.store(optr + dim0[None, :], (acc0 * inv[:, None]).to(oty), mask=row_ok[:, None])
        if P >= 2:
            tl.store(optr + dim1[None, :], (acc1 * inv[:, None]).to(oty), mask=row_ok[:, None])
        if P == 4:
            tl.store(optr + dim2[None, :], (acc2 * inv[:, None]).to(oty), mask=row_ok[:, None])
            tl.store(optr + dim3[None, :], (acc3 * inv[:, None]).to(oty), mask=row_ok[:, None])
    else:
        part = o_row * SPLITS + pid_s
        pptr = part_ptr + part[:, None] * D
        tl.store(pptr + dim0[None, :], acc0 * inv[:, None], mask=row_ok[:, None])
        if P >= 2:
            tl.store(pptr + dim1[None, :], acc1 * inv[:, None], mask=row_ok[:, None])
        if P == 4:
            tl.store(pptr + dim2[None, :], acc2 * inv[:, None], mask=row_ok[:, None])
            tl.store(pptr + dim3[None, :], acc3 * inv[:, None], mask=row_ok[:, None])
        tl.store(ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_splits(part_ptr, ml_ptr, o_ptr, SPLITS, SPAD: tl.constexpr, D: tl.constexpr):
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


# (BLOCK_N, num_warps, num_stages[, 8-bit variant]) per (format, decode?): decode from the H200 sweep
# (`benchmarks/bench_kv_decode.py --only tune`, batch 32, context 32k; 4 warps beat 8 for every
# quantized format, none of these spills in the sm_90 compilation); prefill the smaller tiles.
TILE_CONFIGS = {
    ("dense", True): (64, 4, 3), ("dense", False): (64, 4, 2),
    ("fp8", True): (128, 4, 2), ("fp8", False): (32, 4, 2),
    ("int8", True): (128, 4, 2), ("int8", False): (32, 4, 2),
    ("int4", True): (64, 4, 2), ("int4", False): (32, 4, 2),
    ("kivi2", True): (32, 2, 2), ("kivi2", False): (32, 4, 2),
}


# Quantized decode (one query token): "transposed" = :mod:`.decode_quant` (codes as the tensor-core A
# operand, kept in registers), "general" = the kernel above (benchmarks/bench_kv_decode.py compares them).
QUANT_DECODE = "transposed"
# Quantized decode (fp8 / int8 / int4 / kivi2, one query token): "cuda" = the warp-per-split CUDA kernel of
# :mod:`.cuda_decode` (an error where it cannot serve the shape); "auto" = that kernel for the formats
# of AUTO_CUDA_KINDS where it builds and serves, else Triton; "triton" = Triton only. Environment:
# CONSTANT_STATE_DECODE. The CUDA kernel passed the GPU tests on the H200 (2026-11-23, seventh session).
DECODE_BACKEND = os.environ.get("CONSTANT_STATE_DECODE", "auto")
# Formats "auto" sends to the CUDA kernel: those where it beat Triton on the H200 (batch 32 / 32k,
# benchmarks/ab_quant_decode.py: fp8 551 vs 727 us, int8 575 vs 800, int4 446 vs 588, int4-g32 622 vs
# 714, kivi2 507 vs 669; docs/benchmarks.md, seventh session).
AUTO_CUDA_KINDS = ("fp8", "int8", "int4", "kivi2")
if DECODE_BACKEND not in ("auto", "cuda", "triton"):
    raise ValueError(f"CONSTANT_STATE_DECODE must be auto, cuda or triton, got {DECODE_BACKEND!r}")
# 8-bit formats: dots in the query dtype with the value scale folded into p (True), or codes
# converted to fp16 by bit tricks and values dequantized before the dot (False).
Q8_BF16 = True
# Decode splits: enough (batch x KV head x split) programs for this many programs per SM.
SPLIT_WAVES = {"dense": 2}  # others: 8 (H200: 4 waves for dense was slower at batch 32: 3 splits 1115 us vs 2 958 us)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def programs_per_sm(n_regs: int, shared: int, num_warps: int, props=None) -> int:
    """Resident programs per SM of a compiled kernel (CUDA occupancy rules: registers allocated per
    warp in units of 256, 1 KiB of shared memory reserved per block). ``props``: a
    ``torch.cuda.get_device_properties`` (None: the Hopper figures, 64 Ki registers, 228 KiB)."""
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = regs // regs_per_warp // num_warps
    by_smem = smem // (shared + 1024)
    return max(1, min(by_regs, by_smem, threads // (32 * num_warps), 32))


_OCCUPANCY: dict = {}


def kernel_slots(kernel, make_args, kwargs: dict, device: torch.device) -> int:
    """Programs of ``kernel`` (a ``@triton.jit`` function, launched with ``make_args()`` / ``kwargs``)
    that run at once on the whole GPU: SMs x :func:`programs_per_sm` of its compiled code (compiled,
    not launched, on the first call per configuration; the interpreter: one per SM)."""
    if _INTERPRET or device.type != "cuda":
        return _num_sms(device)
    key = (device.index, getattr(kernel, "fn", kernel).__name__, tuple(sorted(kwargs.items())))
    if key not in _OCCUPANCY:
        compiled = kernel.warmup(*make_args(), grid=(1,), **kwargs)
        compiled._init_handles()  # loads the module: n_regs (the pattern of Triton's fused-softmax tutorial)
        props = torch.cuda.get_device_properties(device)
        _OCCUPANCY[key] = props.multi_processor_count * programs_per_sm(
            compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps, props)
    return _OCCUPANCY[key]


# Per-program cost of a split besides its tiles (prologue, epilogue, its share of the combine), in tiles.
SPLIT_OVERHEAD_TILES = 1.0


@functools.lru_cache(maxsize=4096)
def wave_splits(work: int, n_tiles: int, slots: int, overhead: float = SPLIT_OVERHEAD_TILES) -> int:
    """Splits over the context for ``work`` programs (batch x KV heads) of ``n_tiles`` tiles each, with
    ``slots`` programs resident at once: the fewest splits minimising ``waves x (tiles per program +
    overhead)``, ``waves = ceil(work x splits / slots)``. Programs run in waves of the GPU's slots, so
    a split count whose last wave is part-empty wastes that part (H200, int4, batch 32 / 32k, 528
    slots: 2 splits 587 us, 3 splits 684, 5 splits 649)."""
    best, best_cost = 1, float("inf")
    for s in range(1, min(n_tiles, 1024) + 1):
        chunk = -(-n_tiles // s)
        if -(-n_tiles // chunk) != s:
            continue  # the same chunks as a smaller count
        cost = -(-work * s // slots) * (chunk + overhead)
        if cost < best_cost:
            best, best_cost = s, cost
    return best


def _split_chunks(n_tiles: int, block_n: int, total: int, num_splits: int) -> tuple[int, int]:
    """(tokens per split, splits) for ``num_splits`` splits of ``n_tiles`` tiles over ``total`` tokens:
    whole tiles per split, and the count that covers them."""
    chunk = triton.cdiv(n_tiles, num_splits) * block_n
    return chunk, triton.cdiv(total, chunk)


def _split_buffers(out: torch.Tensor, rows: int, num_splits: int):
    """fp32 partial outputs ``[rows x splits, D]`` and (max, sum) pairs of a split launch (one split:
    ``out`` itself, unused by the kernel)."""
    if num_splits == 1:
        return out, out
    part = torch.empty((rows * num_splits, out.shape[-1]), dtype=torch.float32, device=out.device)
    return part, torch.empty((rows * num_splits, 2), dtype=torch.float32, device=out.device)


def _merge_splits(part: torch.Tensor, ml: torch.Tensor, out: torch.Tensor, rows: int, num_splits: int) -> None:
    """Second step of a split launch: merge the partial softmaxes of ``rows`` query rows into ``out``."""
    if num_splits > 1:
        _combine_splits[(rows,)](part, ml, out, SPLITS=num_splits, SPAD=triton.next_power_of_2(num_splits),
                                 D=out.shape[-1], num_warps=4)


def _scale_args(kind: str, k, ks, vs, res_k, res_v):
    """(res_k, res_v, residual length, key-scale strides, value-scale strides) for the kernels: kivi2's
    key scales are per channel ``[N, H, D]``; other formats pass the key codes as unused residuals."""
    if kind == "kivi2":
        return res_k, res_v, res_k.shape[1], (ks.stride(0), 0, ks.stride(1)), (vs.stride(0), vs.stride(1), vs.stride(2))
    if kind == "dense":
        return k, k, 0, (0, 0, 0), (0, 0, 0)
    return k, k, 0, (ks.stride(0), ks.stride(1), ks.stride(2)), (vs.stride(0), vs.stride(1), vs.stride(2))


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
    for x in (k, ks, vs):  # kivi2's key channel scales [N, H, D]: each block's and head's dims contiguous
        if not (x.is_contiguous() or (kind != "dense" and (x.dim() == 4 and is_head_major(x)
                                                           or x.dim() == 3 and x.stride(2) == 1))):
            raise ValueError("cache tensors must be contiguous or (quantized) head-major (see ref.head_major)")
    if v.shape != k.shape or not (v.stride() == k.stride() or (kind != "dense" and is_token_contiguous(v))):
        raise ValueError("value codes must match the keys' shape: contiguous, or (quantized) tokens contiguous "
                         "within a block (see ref.token_contiguous)")
    q = q.contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    if not _INTERPRET and d // p < 16:
        raise ValueError(f"{kind}: head_dim {d} / {p} values per byte must be >= 16 for the GPU kernel's dots")
    if kind == "kivi2" and (res_k is None or res_v is None or res_k.shape[0] != b):
        raise ValueError(f"kivi2 needs res_k, res_v [B={b}, R, Hkv, D]")
    cuda_wanted = DECODE_BACKEND == "cuda" or (DECODE_BACKEND == "auto" and kind in AUTO_CUDA_KINDS)
    if t == 1 and kind != "dense" and config is None and cuda_wanted:
        from . import cuda_decode

        if not _INTERPRET and cuda_decode.supports(kind, group, q, (k, v, ks, vs, kz, vz), hkv, res_k, res_v):
            return cuda_decode.decode(q, kind, group, (k, v, ks, vs, kz, vz), block_tables, seq_lens, scale,
                                      sliding_window, sinks, num_splits, res_k, res_v)
        if DECODE_BACKEND == "cuda":
            raise ValueError(f"CONSTANT_STATE_DECODE=cuda: the CUDA decode kernel does not serve {kind} with "
                             f"q {tuple(q.shape)} {q.dtype}, block size {bs} (see cuda_decode.supports)")
    # Quantized decode: the transposed kernel (kivi2 on the GPU needs blocks of >= 16 tokens there).
    if t == 1 and kind != "dense" and QUANT_DECODE == "transposed" and (kind != "kivi2" or bs >= 16 or _INTERPRET):
        from .decode_quant import quant_decode

        return quant_decode(q, kind, p, group, (k, v, ks, vs, kz, vz), block_tables, seq_lens, scale,
                            sliding_window, sinks, num_splits, res_k, res_v, config,
                            _INTERPRET or q.dtype == torch.float32)
    m = block_tables.shape[1]
    gq = hq // hkv
    gpad = max(triton.next_power_of_2(gq), 1)
    if t == 1:
        block_t = 1
        gpad = max(gpad, 16)  # tl.dot needs 16 rows
    else:
        block_t = max(16 // gpad, 64 // gpad, 1)
    block_n, num_warps, num_stages, *variant = (config or TILE_CONFIGS[(kind, t == 1)])
    q8_bf16 = bool(variant[0]) if variant else Q8_BF16
    if kind == "kivi2" and config is None:
        # A tile inside one block (channel scales fold into the queries); dots need 16 tokens.
        block_n = max(16, min(block_n, bs))
    n_tiles = triton.cdiv(m * bs, block_n)
    if num_splits is None:
        # Static: enough programs for SPLIT_WAVES waves of SMs at any batch, from shapes only; dense
        # rounds up to a power of two (H200, batch 8 / 32k: 5 splits 283 us, 8 splits 260 us, 9: 355 us).
        waves = SPLIT_WAVES.get(kind, 8)
        num_splits = 1 if t > 1 else max(1, min(n_tiles, triton.cdiv(waves * _num_sms(q.device), b * hkv)))
        if kind == "dense" and num_splits > 1:
            num_splits = min(n_tiles, triton.next_power_of_2(num_splits))
    chunk, num_splits = _split_chunks(n_tiles, block_n, m * bs, num_splits)
    out = torch.empty_like(q)
    part, ml = _split_buffers(out, b * t * hq, num_splits)
    res_k, res_v, r, kstr, vstr = _scale_args(kind, k, ks, vs, res_k, res_v)
    grid = (b * hkv, triton.cdiv(t, block_t), num_splits)
    _paged_attn_kernel[grid](
        q, out, part, ml, k, v, ks, vs, kz, vz, res_k, res_v, block_tables, seq_lens,
        t, hq, hkv, m, r, scale * 1.4426950408889634,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), v.stride(3), *kstr, *vstr,
        sliding_window or 0, sinks, gq, chunk, num_splits,
        KIND=KIND_IDS[kind], P=p, D=d, GROUP=group, BS=bs, GPAD=gpad, BLOCK_T=block_t, BLOCK_N=block_n,
        SPLIT=num_splits > 1, HAS_WINDOW=sliding_window is not None, Q8_BF16=q8_bf16,
        DOT_F32=_INTERPRET or q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    _merge_splits(part, ml, out, b * t * hq, num_splits)
    return out
