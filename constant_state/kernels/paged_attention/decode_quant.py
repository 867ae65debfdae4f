"""Decode attention over quantized paged blocks, with the code tiles as the tensor-core A operand.

The general kernel in :mod:`.decode` computes ``scores = Q @ K^T`` with the dequantized key tile as
the right-hand (B) operand, which the tensor cores read from shared memory: every dequantized value
is written to shared memory and read back, and on the H200 that traffic, not HBM, bounds the
quantized formats (fp8 ran at 2 TB/s, int4 at 0.9 TB/s). Here both products are transposed so that
the large, quantized operand is the left-hand (A) operand, which stays in registers, and the small
query / probability operand is the one staged through shared memory::

    S^T [N, C]  = K_codes [N, D]    @ Qx [D, C]       (Qx: the G queries, per column block)
    O^T [D, C] += V_codes^T [D, N]  @ Px [N, C]       (Px: probabilities times value scales)

Columns ``c = (block, r)``: one block per value group (``NGP = D / GROUP``; 8-bit formats: one) of
``GQ >= G`` query heads (padded so that there are at least 16 columns, the smallest product). Scales and zero
points never touch the big tiles: they multiply the small ``[N, C]`` tiles.

- 8-bit formats: one block holds the queries; key scales multiply the rows of ``S``, value scales
  fold into ``Px``.
- int4 (scale and zero per token and group of dims): block ``g`` of ``Qx`` holds the queries on the
  dims of group ``g`` only, so ``S[:, (g, r)]`` is the group-``g`` partial dot, scaled by the
  token's group-``g`` scale (plus zero x the query's group sum), and the blocks are summed. Values:
  block ``g`` of ``Px`` carries the group-``g`` value scales; an output dim of group ``g`` is read
  from column block ``g``.
- KIVI 2-bit: keys have scales per channel and block, folded into ``Qx`` once per tile: a tile of
  ``KB`` blocks puts block ``bb``'s scaled queries in column block ``bb`` and each token takes the
  column block of its block (or the tile lies inside one block); values as int4. The fp16 residual
  window is a dense tail.

Packed codes are split into ``P`` value slots (slot ``j`` = bits ``[8j/P, 8(j+1)/P)`` of every
byte, dims ``ref.pack_order``), one product per slot. A slot is decoded without shifts as
``c * 2^(bits j)`` (masking the byte and or-ing the fp16 exponent of 1024), and the power of two is
folded into ``Qx`` (keys) and into the final scale of the slot's accumulator (values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import _slot_dims
from .ref import is_token_contiguous


@triton.jit
def _slot_codes(c, j: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr,
                OFF: tl.constexpr = 0):
    """Value slot ``j`` of code bytes ``c`` as exact ``DT`` numbers (packed formats: ``code * 2^(BITS j)``).
    ``OFF`` (bits): 1 = int8 / packed codes keep the offset of the fp16 bit trick (``1152 + code`` for
    int8, else ``1024 + code``: one subtraction less per pair of codes); the caller subtracts ``offset *
    sum(other operand)`` once per column (``OFFSET_KEYS`` / ``OFFSET_VALUES``). 2 = packed codes
    decoded by inline PTX (``ASM_FORMATS``; never under the interpreter, which cannot run PTX)."""
    if KIND == 1:
        x = c.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    elif KIND == 2:
        # int8 via fp16 bits: 0x6400 | (c ^ 0x80) = 1024 + c + 128.
        x = ((c.to(tl.int16) & 0xFF) ^ 0x6480).to(tl.float16, bitcast=True)
        if OFF % 2 == 0:
            x = x - 1152.0
    elif OFF >= 2:
        # packed codes on the GPU: 4 bytes per instance, one lop3 per pair of codes ((w & mask) |
        # 0x64006400: 1024 + code * 2^(BITS j)) and two prmt to pair bytes (0, 1) and (2, 3);
        # Triton's own code spreads each byte to 16 bits first.
        x = tl.inline_asm_elementwise(
            "{ .reg .b32 t0, t1; shr.b32 t1, $2, 8; "
            f"lop3.b32 t0, $2, {(((1 << BITS) - 1) * 0x00010001) << (BITS * j)}, 0x64006400, 0xEA; "
            f"lop3.b32 t1, t1, {(((1 << BITS) - 1) * 0x00010001) << (BITS * j)}, 0x64006400, 0xEA; "
            "prmt.b32 $0, t0, t1, 0x5410; prmt.b32 $1, t0, t1, 0x7632; }",
            "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4)
        if OFF % 2 == 0:
            x = x - 1024.0
    else:
        m = c.to(tl.int16) & (((1 << BITS) - 1) << (BITS * j))
        x = (m | 0x6400).to(tl.float16, bitcast=True)
        if OFF % 2 == 0:
            x = x - 1024.0
    return x.to(DT)


@triton.jit
def _softmax_cols(s, ok, m_i, l_i):
    """Online softmax over the rows (tokens) of ``s [N, GQ]``; ``l_i [N, GQ]`` holds per-row partial
    sums, reduced once at the end (a sum over tokens crosses warps: shared memory and barriers)."""
    s = tl.where(ok[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[None, :])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha[None, :] + p
    return p, alpha, m_new, l_i


@triton.jit
def _cols(x, NGP: tl.constexpr, GQ: tl.constexpr):
    """``[GQ]`` per query head -> ``[NGP * GQ]`` per column."""
    return tl.reshape(tl.broadcast_to(x[None, :], (NGP, GQ)), (NGP * GQ,))


@triton.jit
def _per_col(x, N: tl.constexpr, NGP: tl.constexpr, GQ: tl.constexpr):
    """Per-group values ``[N, NGP]`` -> ``[N, NGP * GQ]`` per column (block g = group g), fp32."""
    return tl.reshape(tl.broadcast_to(x.to(tl.float32)[:, :, None], (N, NGP, GQ)), (N, NGP * GQ))


@triton.jit
def _group_scales(ptr, row, mask_n, offs_g, NG: tl.constexpr):
    """Per-token scales (or zero points) ``[N, NGP]`` at ``ptr + row + g`` (0 for blocks ``g >= NG``), fp16."""
    return tl.load(ptr + row[:, None] + offs_g[None, :], mask=mask_n[:, None] & (offs_g < NG)[None, :], other=0.0)


@triton.jit
def _tile_blocks(bt_row, offs_n, q_hi, BS: tl.constexpr):
    """Block ids of tokens ``offs_n`` of a row (block 0 past ``q_hi``), int64."""
    return tl.load(bt_row + offs_n // BS, mask=offs_n < q_hi, other=0).to(tl.int64)


@triton.jit
def _token_scales(ptr, blk, offs_n, q_hi, h, sb, st, sh, offs_g, NG: tl.constexpr, BS: tl.constexpr):
    """Per-token scales (or zero points) ``[N, NGP]`` of tokens ``offs_n`` in blocks ``blk``."""
    return _group_scales(ptr, blk * sb + (offs_n % BS) * st + h * sh, offs_n < q_hi, offs_g, NG)


@triton.jit
def _kivi_blocks(bt_row, start, offs_g, q_hi, KB: tl.constexpr, BS: tl.constexpr):
    """kivi2: ids of the ``KB`` blocks of the tile at ``start``, as ``[NGP]`` (block 0 past them)."""
    return tl.load(bt_row + start // BS + offs_g, mask=(offs_g < KB) & (start + offs_g * BS < q_hi),
                   other=0).to(tl.int64)


@triton.jit
def _kivi_key_scales(ks_ptr, kz_ptr, off, dim0, dim1, dim2, dim3):
    """kivi2: per-channel key scales and zero points of the blocks at offsets ``off [NGP]``, per value
    slot (``[D / 4, NGP]`` each)."""
    o = off[None, :]
    return (tl.load(ks_ptr + o + dim0[:, None]), tl.load(ks_ptr + o + dim1[:, None]),
            tl.load(ks_ptr + o + dim2[:, None]), tl.load(ks_ptr + o + dim3[:, None]),
            tl.load(kz_ptr + o + dim0[:, None]), tl.load(kz_ptr + o + dim1[:, None]),
            tl.load(kz_ptr + o + dim2[:, None]), tl.load(kz_ptr + o + dim3[:, None]))


@triton.jit
def _quant_decode_kernel(
    q_ptr, o_ptr, part_ptr, ml_ptr,
    k_ptr, v_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr, rk_ptr, rv_ptr,
    bt_ptr, seq_ptr,
    HQ, HKV, M, R, scale_log2,
    stride_cb, stride_ct, stride_ch,  # key codes: block, token, head (elements; unit stride along the head dim)
    stride_wb, stride_wh,  # value codes: block, head (token-contiguous, VT; else the keys' strides)
    stride_kb, stride_kt, stride_kh,  # key scales / zeros: block, token, head
    stride_vb, stride_vt, stride_vh,  # value scales / zeros: block, token, head
    WINDOW, SINKS, G, CHUNK, SPLITS,
    KIND: tl.constexpr, P: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, BS: tl.constexpr,
    GQ: tl.constexpr, NGP: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr,
    SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr, VT: tl.constexpr,
    KOFF: tl.constexpr, VOFF: tl.constexpr,  # keys / values: OFF of _slot_codes (1: offset kept, 2: PTX)
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    seq_len = tl.load(seq_ptr + b)

    if DOT_F32:
        DT: tl.constexpr = tl.float32
    else:
        DT: tl.constexpr = tl.float16
    PREC: tl.constexpr = "ieee"
    BITS: tl.constexpr = 8 // P
    DP: tl.constexpr = D // P  # bytes per token and head = rows of a slot
    GP: tl.constexpr = GROUP // P  # bytes of one dim group in a slot
    NG: tl.constexpr = D // GROUP
    C: tl.constexpr = NGP * GQ
    KGROUPED: tl.constexpr = KIND == 3  # int4: key scales per dim group

    offs_i = tl.arange(0, DP)
    offs_c = tl.arange(0, C)
    col_blk = offs_c // GQ
    col_r = offs_c % GQ
    row_grp = offs_i // GP
    head_ok = col_r < G
    qrow = b.to(tl.int64) * HQ + h * G + col_r  # [C] flat (row, query head), T == 1
    if KGROUPED:
        q_ok = (row_grp[:, None] == col_blk[None, :]) & head_ok[None, :]
    elif KIND == 4:
        # kivi2: column block bb scores the tile's block bb (its channel scales folded in per tile).
        q_ok = (offs_i[:, None] >= 0) & ((col_blk < KB) & head_ok)[None, :]
    else:
        q_ok = (offs_i[:, None] >= 0) & ((col_blk == 0) & head_ok)[None, :]
    # Queries per slot, [DP, C] fp32: column block g holds the queries on group g's dims (int4) or
    # block 0 holds them (others); key-side operands Qx scaled by 2^-(BITS j) for the slot decoding.
    dim0 = _slot_dims(0, P, D, GROUP)
    q0 = tl.load(q_ptr + qrow[None, :] * D + dim0[:, None], mask=q_ok, other=0.0).to(tl.float32)
    qsum = tl.sum(q0, 0)
    acc0 = tl.zeros([DP, C], tl.float32)
    if KIND != 4:
        b0 = q0.to(DT)
    if P >= 2:
        dim1 = _slot_dims(1, P, D, GROUP)
        q1 = tl.load(q_ptr + qrow[None, :] * D + dim1[:, None], mask=q_ok, other=0.0).to(tl.float32)
        qsum += tl.sum(q1, 0)
        acc1 = tl.zeros([DP, C], tl.float32)
        if KIND != 4:
            b1 = (q1 * (1.0 / (1 << BITS))).to(DT)
    if P == 4:
        dim2 = _slot_dims(2, P, D, GROUP)
        dim3 = _slot_dims(3, P, D, GROUP)
        q2 = tl.load(q_ptr + qrow[None, :] * D + dim2[:, None], mask=q_ok, other=0.0).to(tl.float32)
        q3 = tl.load(q_ptr + qrow[None, :] * D + dim3[:, None], mask=q_ok, other=0.0).to(tl.float32)
        acc2 = tl.zeros([DP, C], tl.float32)
        acc3 = tl.zeros([DP, C], tl.float32)
    if KIND == 4:
        ones = tl.full([BLOCK_N, DP], 1.0, DT)
    if KIND >= 3:
        zacc = tl.zeros([BLOCK_N, C], tl.float32)  # sum_n p * (value zero point of the column's group), per row
    OFFV: tl.constexpr = 1152.0 if KIND == 2 else 1024.0
    if KOFF % 2 == 1:
        # codes offset + c: scores gain offset * (sum of the column's key operand), taken off per tile
        kcorr = tl.sum(b0.to(tl.float32), 0)
        if P >= 2:
            kcorr += tl.sum(b1.to(tl.float32), 0)
        kcorr = kcorr * OFFV
    if VOFF % 2 == 1:
        pxs = tl.zeros([BLOCK_N, C], tl.float32)  # sum_n px per row: the value codes' offset, taken off at the end
    offs_g = tl.arange(0, NGP)

    k_lo = pid_s * CHUNK
    k_hi = tl.minimum(seq_len, (pid_s + 1) * CHUNK)
    if HAS_WINDOW:
        win_lo = (seq_len - WINDOW) // BLOCK_N * BLOCK_N
        k_lo = tl.maximum(k_lo, tl.where(SINKS > 0, 0, win_lo))
    qpos = seq_len - 1
    m_i = tl.full([GQ], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N, GQ], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * M
    q_hi = k_hi
    if KIND == 4:
        F = seq_len // R * R  # kivi2: tokens from F on sit in the residual window
        q_hi = tl.minimum(k_hi, F)
    # Scales and zero points are loaded one tile ahead (and block ids two tiles ahead): they are too
    # narrow for Triton's pipelining of the code tiles, and would otherwise stall every tile on a
    # full memory latency (measured on the H200: about 2 us per tile, whatever the format).
    offs_a = k_lo + tl.arange(0, BLOCK_N)
    blk_a = _tile_blocks(bt_row, offs_a, q_hi, BS)
    if KIND == 4:
        ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3 = _kivi_key_scales(
            ks_ptr, kz_ptr, _kivi_blocks(bt_row, k_lo, offs_g, q_hi, KB, BS) * stride_kb + h * stride_kh,
            dim0, dim1, dim2, dim3)
        kb_b = _kivi_blocks(bt_row, k_lo + BLOCK_N, offs_g, q_hi, KB, BS)
    else:
        ks_n = _token_scales(ks_ptr, blk_a, offs_a, q_hi, h, stride_kb, stride_kt, stride_kh, offs_g, NG, BS)
        if KIND == 3:
            kz_n = _token_scales(kz_ptr, blk_a, offs_a, q_hi, h, stride_kb, stride_kt, stride_kh, offs_g, NG, BS)
    vs_n = _token_scales(vs_ptr, blk_a, offs_a, q_hi, h, stride_vb, stride_vt, stride_vh, offs_g, NG, BS)
    if KIND >= 3:
        vz_n = _token_scales(vz_ptr, blk_a, offs_a, q_hi, h, stride_vb, stride_vt, stride_vh, offs_g, NG, BS)
    blk_b = _tile_blocks(bt_row, k_lo + BLOCK_N + tl.arange(0, BLOCK_N), q_hi, BS)
    for start in range(k_lo, q_hi, BLOCK_N):
        # ---- this tile's scales (loaded last iteration); issue the next tile's ----
        offs_b = start + BLOCK_N + tl.arange(0, BLOCK_N)
        vs_t = vs_n
        vs_n = _token_scales(vs_ptr, blk_b, offs_b, q_hi, h, stride_vb, stride_vt, stride_vh, offs_g, NG, BS)
        if KIND >= 3:
            vz_t = vz_n
            vz_n = _token_scales(vz_ptr, blk_b, offs_b, q_hi, h, stride_vb, stride_vt, stride_vh, offs_g, NG, BS)
        if KIND == 4:
            b0 = (q0 * _per_col(ks0, DP, NGP, GQ)).to(DT)
            b1 = (q1 * _per_col(ks1, DP, NGP, GQ) * (1.0 / 4)).to(DT)
            b2 = (q2 * _per_col(ks2, DP, NGP, GQ) * (1.0 / 16)).to(DT)
            b3 = (q3 * _per_col(ks3, DP, NGP, GQ) * (1.0 / 64)).to(DT)
            # zero points: q . kz per column, summed over the dims by a product with a ones tile (a sum
            # over the dims in registers crosses lanes: shuffles)
            zs = q0 * _per_col(kz0, DP, NGP, GQ) + q1 * _per_col(kz1, DP, NGP, GQ)
            zs += q2 * _per_col(kz2, DP, NGP, GQ) + q3 * _per_col(kz3, DP, NGP, GQ)
            ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3 = _kivi_key_scales(
                ks_ptr, kz_ptr, kb_b * stride_kb + h * stride_kh, dim0, dim1, dim2, dim3)
            kb_b = _kivi_blocks(bt_row, start + 2 * BLOCK_N, offs_g, q_hi, KB, BS)
        else:
            ks_t = ks_n
            ks_n = _token_scales(ks_ptr, blk_b, offs_b, q_hi, h, stride_kb, stride_kt, stride_kh, offs_g, NG, BS)
            if KIND == 3:
                kz_t = kz_n
                kz_n = _token_scales(kz_ptr, blk_b, offs_b, q_hi, h, stride_kb, stride_kt, stride_kh, offs_g, NG, BS)
        blk_b = _tile_blocks(bt_row, start + 2 * BLOCK_N + tl.arange(0, BLOCK_N), q_hi, BS)

        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < q_hi
        blk = _tile_blocks(bt_row, offs_n, q_hi, BS)
        tok = offs_n % BS
        crow = blk * stride_cb + tok * stride_ct + h * stride_ch
        ok = mask_n
        if HAS_WINDOW:
            ok &= (offs_n > qpos - WINDOW) | (offs_n < SINKS)
        # ---- scores: S [N, C] = sum over slots of codes [N, DP] @ Qx [DP, C] ----
        kc = tl.load(k_ptr + crow[:, None] + offs_i[None, :], mask=mask_n[:, None], other=0)
        S = tl.dot(_slot_codes(kc, 0, KIND, BITS, DT, KOFF), b0, input_precision=PREC)
        if P >= 2:
            S = tl.dot(_slot_codes(kc, 1, KIND, BITS, DT, KOFF), b1, S, input_precision=PREC)
        if P == 4:
            S = tl.dot(_slot_codes(kc, 2, KIND, BITS, DT, KOFF), b2, S, input_precision=PREC)
            S = tl.dot(_slot_codes(kc, 3, KIND, BITS, DT, KOFF), b3, S, input_precision=PREC)
        if KOFF % 2 == 1:
            S = S - kcorr[None, :]
        if KIND == 1 or KIND == 2:
            S = S * _per_col(ks_t, BLOCK_N, NGP, GQ)
        elif KIND == 3:
            S = S * _per_col(ks_t, BLOCK_N, NGP, GQ) + _per_col(kz_t, BLOCK_N, NGP, GQ) * qsum[None, :]
        else:
            S = tl.dot(ones, zs.to(DT), S, input_precision=PREC)
        if KIND == 4:
            # each token takes the column block of its block within the tile
            tb = tl.arange(0, BLOCK_N) // BS
            s = tl.sum(tl.where(tb[:, None, None] == offs_g[None, :, None], tl.reshape(S, (BLOCK_N, NGP, GQ)), 0.0), 1)
            s = s * scale_log2
        else:
            s = tl.sum(tl.reshape(S, (BLOCK_N, NGP, GQ)), 1) * scale_log2
        p, alpha, m_i, l_i = _softmax_cols(s, ok, m_i, l_i)
        pc = tl.reshape(tl.broadcast_to(p[:, None, :], (BLOCK_N, NGP, GQ)), (BLOCK_N, C))
        alpha_c = _cols(alpha, NGP, GQ)
        px = (pc * _per_col(vs_t, BLOCK_N, NGP, GQ)).to(DT)
        if KIND >= 3:
            zacc = zacc * alpha_c[None, :] + pc * _per_col(vz_t, BLOCK_N, NGP, GQ)
        if VOFF % 2 == 1:
            pxs = pxs * alpha_c[None, :] + px.to(tl.float32)
        # ---- values: O^T [DP, C] += codes^T [DP, N] @ Px [N, C] ----
        if VT:
            # value codes token-contiguous within a block (ref.token_contiguous), bytes BS apart. Tiles
            # start at multiples of BLOCK_N, so runs of RUN = min(BS, BLOCK_N) tokens share a block and
            # are contiguous; the mask is per run (tokens past the end inside the row's last block are
            # read, finite codes, and weighted by p = 0) so that the loads stay vectorized.
            RUN: tl.constexpr = BS if BS < BLOCK_N else BLOCK_N
            vrow = blk * stride_wb + tok + h * stride_wh
            voff = tl.max_contiguous(tl.multiple_of(vrow[None, :] + offs_i[:, None] * BS, [1, RUN]), [1, RUN])
            vmask = ((start + tl.arange(0, BLOCK_N) // RUN * RUN) < q_hi)[None, :]
            vc = tl.load(v_ptr + voff, mask=vmask, other=0)
        else:  # token-major: the keys' layout and offsets
            vc = tl.load(v_ptr + crow[None, :] + offs_i[:, None], mask=mask_n[None, :], other=0)
        acc0 = tl.dot(_slot_codes(vc, 0, KIND, BITS, DT, VOFF), px, acc0 * alpha_c[None, :], input_precision=PREC)
        if P >= 2:
            acc1 = tl.dot(_slot_codes(vc, 1, KIND, BITS, DT, VOFF), px, acc1 * alpha_c[None, :], input_precision=PREC)
        if P == 4:
            acc2 = tl.dot(_slot_codes(vc, 2, KIND, BITS, DT, VOFF), px, acc2 * alpha_c[None, :], input_precision=PREC)
            acc3 = tl.dot(_slot_codes(vc, 3, KIND, BITS, DT, VOFF), px, acc3 * alpha_c[None, :], input_precision=PREC)

    if KIND == 4:
        # kivi2: the row's newest tokens [F, seq_len) from its fp16 residual window [B, R, Hkv, D];
        # their value products are pre-multiplied by 2^(BITS j), undone with the slot's codes below.
        first = (col_blk == 0)[None, :]
        r0 = tl.where(first, q0, 0.0).to(DT)
        r1 = tl.where(first, q1, 0.0).to(DT)
        r2 = tl.where(first, q2, 0.0).to(DT)
        r3 = tl.where(first, q3, 0.0).to(DT)
        for start in range(tl.maximum(k_lo, F), k_hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < k_hi
            ok = mask_n
            if HAS_WINDOW:
                ok &= (offs_n > qpos - WINDOW) | (offs_n < SINKS)
            rrow = ((b.to(tl.int64) * R + (offs_n - F)) * HKV + h) * D
            rk = rk_ptr + rrow[:, None]
            m2 = mask_n[:, None]
            S = tl.dot(tl.load(rk + dim0[None, :], mask=m2, other=0.0).to(DT), r0, input_precision=PREC)
            S = tl.dot(tl.load(rk + dim1[None, :], mask=m2, other=0.0).to(DT), r1, S, input_precision=PREC)
            S = tl.dot(tl.load(rk + dim2[None, :], mask=m2, other=0.0).to(DT), r2, S, input_precision=PREC)
            S = tl.dot(tl.load(rk + dim3[None, :], mask=m2, other=0.0).to(DT), r3, S, input_precision=PREC)
            s = tl.sum(tl.reshape(S, (BLOCK_N, NGP, GQ)), 1) * scale_log2
            p, alpha, m_i, l_i = _softmax_cols(s, ok, m_i, l_i)
            pc = tl.reshape(tl.broadcast_to(p[:, None, :], (BLOCK_N, NGP, GQ)), (BLOCK_N, C))
            alpha_c = _cols(alpha, NGP, GQ)
            zacc = zacc * alpha_c[None, :]
            if VOFF % 2 == 1:
                pxs = pxs * alpha_c[None, :]
            rv = rv_ptr + rrow[None, :]
            mt = mask_n[None, :]
            acc0 = acc0 * alpha_c[None, :] + tl.dot(
                tl.load(rv + dim0[:, None], mask=mt, other=0.0).to(DT), pc.to(DT), input_precision=PREC)
            acc1 = acc1 * alpha_c[None, :] + tl.dot(
                tl.load(rv + dim1[:, None], mask=mt, other=0.0).to(DT), (pc * 4.0).to(DT), input_precision=PREC)
            acc2 = acc2 * alpha_c[None, :] + tl.dot(
                tl.load(rv + dim2[:, None], mask=mt, other=0.0).to(DT), (pc * 16.0).to(DT), input_precision=PREC)
            acc3 = acc3 * alpha_c[None, :] + tl.dot(
                tl.load(rv + dim3[:, None], mask=mt, other=0.0).to(DT), (pc * 64.0).to(DT), input_precision=PREC)

    # ---- outputs: dim of slot j, byte i, query head r from column (group of byte i, r) ----
    l_i = tl.sum(l_i, 0)
    l_c = _cols(l_i, NGP, GQ)
    inv = 1.0 / tl.where(l_c == 0.0, 1.0, l_c)
    if KIND >= 3:
        zo = tl.sum(zacc, 0) * inv
    else:
        zo = tl.zeros([C], tl.float32)
    if VOFF % 2 == 1:
        vcorr = tl.sum(pxs, 0) * OFFV
        acc0 -= vcorr[None, :]
        if P >= 2:
            acc1 -= vcorr[None, :]
        if P == 4:
            acc2 -= vcorr[None, :]
            acc3 -= vcorr[None, :]
    keep = (row_grp[:, None] == col_blk[None, :]) & head_ok[None, :]
    if SPLIT:
        orow = (qrow * SPLITS + pid_s) * D
        optr = part_ptr + orow[None, :]
        oty = tl.float32
    else:
        optr = o_ptr + (qrow * D)[None, :]
        oty = o_ptr.dtype.element_ty
    tl.store(optr + dim0[:, None], (acc0 * inv[None, :] + zo[None, :]).to(oty), mask=keep)
    if P >= 2:
        tl.store(optr + dim1[:, None], (acc1 * (inv * (1.0 / (1 << BITS)))[None, :] + zo[None, :]).to(oty),
                 mask=keep)
    if P == 4:
        tl.store(optr + dim2[:, None], (acc2 * (inv * (1.0 / 16))[None, :] + zo[None, :]).to(oty), mask=keep)
        tl.store(optr + dim3[:, None], (acc3 * (inv * (1.0 / 64))[None, :] + zo[None, :]).to(oty), mask=keep)
    if SPLIT:
        r = tl.arange(0, GQ)
        part = (b.to(tl.int64) * HQ + h * G + r) * SPLITS + pid_s
        tl.store(ml_ptr + part * 2, m_i, mask=r < G)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=r < G)


# fp16 products (bf16 / fp16 queries): formats whose key / value codes enter the dots with the fp16
# bit trick's offset (1024 + code; int8 1152 + code), taken off once per column instead of once per
# pair of codes. H200, batch 32 / 32k: int4-g32 869 -> 778 us, int4 686 -> 683; int8 792 -> 879 and
# kivi2 (values) 931 -> 954 (more registers: spills), so those keep the subtraction.
OFFSET_KEYS = {"int4"}
OFFSET_VALUES = {"int4"}
# Packed formats whose codes are decoded by inline PTX (format kind -> group sizes, None: all), 4
# codes per lop3 pair: int4 group 64 683 -> 651 us; group 32 778 -> 860 (slower: not used).
ASM_FORMATS = {"int4": (64,), "kivi2": None}
# 8-bit formats: query heads in column block 0 of several (the softmax over the real heads only), or
# padded to 16 columns in one block (False).
EIGHT_BIT_BLOCKS = False
# (BLOCK_N, num_warps, num_stages[, maxnreg]) per format; kivi2's BLOCK_N is capped at the block size.
# From the H200 sweep (benchmarks/bench_kv_decode.py --only tune, batch 32, context 32k): a register
# cap of 168 fits 3 programs per SM for the 8-bit and kivi2 kernels (fp8 824 -> 735 us); int4 is as
# fast with 2 warps and 64-token tiles as with 4 and 128 (780 vs 796 us); 1 warp and caps of 128 slower.
# kivi2: two 32-token blocks per tile, 2 warps (937 us; one block per tile 1229-1275, 128 tokens 1034-1314).
# Stages: with 3, Triton keeps one buffer of code tiles (block ids, codes and their use take the three
# stages); 5 give two, 7 three. Fourth session (splits from occupancy): kivi2 694 -> 682 (5) -> 663 us
# (7); int4 584 / 582 / 583, int4-g32 708 / 724 / 762, fp8 724 / 827 / 894: only kivi2 takes them.
TILE_CONFIGS = {"fp8": (128, 4, 3, 168), "int8": (128, 4, 3, 168), "int4": (64, 2, 3), "kivi2": (64, 2, 7)}


def _offset(kind, group, dot_f32, kinds) -> int:
    """``OFF`` of :func:`_slot_codes` (fp32 queries: 0): 1 if the format keeps the offset in this
    product (``kinds``), plus 2 if its codes are decoded by inline PTX."""
    if dot_f32:
        return 0
    groups = ASM_FORMATS.get(kind, ())
    return int(kind in kinds) + 2 * (groups is None or group in groups)


def quant_decode(q, kind, per_byte, group, tensors, block_tables, seq_lens, scale, sliding_window, sinks,
                 num_splits, res_k, res_v, config, dot_f32):
    """Launch for :func:`.decode.paged_attention` with one query token (arguments validated there)."""
    from .decode import _merge_splits, _scale_args, _split_buffers, _split_chunks, kernel_slots, wave_splits

    k, v, ks, vs, kz, vz = tensors
    vt = is_token_contiguous(v)  # else the keys' layout (decode.paged_attention validated it)
    b, t, hq, d = q.shape
    n, bs, hkv = k.shape[:3]
    m = block_tables.shape[1]
    g = hq // hkv
    gq = triton.next_power_of_2(g)
    if kind in ("fp8", "int8") and EIGHT_BIT_BLOCKS:
        ngp = max(1, triton.cdiv(16, gq))  # the queries in block 0, the other blocks zero: softmax on GQ columns
    elif kind == "kivi2":
        # column blocks: value groups, and key blocks of a tile (several blocks per tile)
        ngp = max(d // group, triton.cdiv(16, gq))
    else:
        ngp = d // group  # column blocks = value groups; query heads padded to fill 16 columns
        gq = max(gq, triton.cdiv(16, ngp))
    block_n, num_warps, num_stages, *maxnreg = config or TILE_CONFIGS[kind]
    extra = {"maxnreg": maxnreg[0]} if maxnreg and maxnreg[0] else {}
    kb = 1
    if kind == "kivi2":
        # A tile covers kb whole blocks (column block bb scores block bb, its channel scales folded
        # into the queries), at most one per column block, or lies inside one block.
        block_n = min(block_n, ngp * bs)
        if block_n >= bs and block_n % bs == 0:
            kb = block_n // bs
        elif bs % block_n:
            raise ValueError(f"kivi2 decode tile {block_n} and block size {bs}: one must divide the other")
    n_tiles = triton.cdiv(m * bs, block_n)
    res_k, res_v, r, kstr, vstr = _scale_args(kind, k, ks, vs, res_k, res_v)
    kind_id = {"fp8": 1, "int8": 2, "int4": 3, "kivi2": 4}[kind]
    consts = dict(
        KIND=kind_id, P=per_byte, D=d, GROUP=group, BS=bs, GQ=gq, NGP=ngp, BLOCK_N=block_n, KB=kb,
        HAS_WINDOW=sliding_window is not None, DOT_F32=dot_f32,
        VT=vt, KOFF=_offset(kind, group, dot_f32, OFFSET_KEYS),
        VOFF=_offset(kind, group, dot_f32, OFFSET_VALUES),
        num_warps=num_warps, num_stages=num_stages, **extra,
    )
    out = torch.empty_like(q)

    def args(part, ml, chunk, splits):
        return (q, out, part, ml, k, v, ks, vs, kz, vz, res_k, res_v, block_tables, seq_lens,
                hq, hkv, m, r, scale * 1.4426950408889634,
                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(2), *kstr, *vstr,
                sliding_window or 0, sinks, g, chunk, splits)

    if num_splits is None:
        # as many splits as fill the GPU's slots in whole waves (occupancy of the split kernel)
        f32 = lambda: q.new_empty(2, dtype=torch.float32)  # noqa: E731 (partials: only their dtype counts)
        slots = kernel_slots(_quant_decode_kernel, lambda: args(f32(), f32(), block_n, 2), dict(consts, SPLIT=True),
                             q.device)
        num_splits = wave_splits(b * hkv, n_tiles, slots)
    chunk, num_splits = _split_chunks(n_tiles, block_n, m * bs, num_splits)
    part, ml = _split_buffers(out, b * hq, num_splits)
    _quant_decode_kernel[(b * hkv, num_splits)](*args(part, ml, chunk, num_splits), SPLIT=num_splits > 1, **consts)
    _merge_splits(part, ml, out, b * hq, num_splits)
    return out
