"""Reference attention over a paged KV cache, in fp32: the CPU path and the kernels' oracle."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def gather_paged(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """``cache [N, bs, H, D]`` read through ``block_tables [B, M]`` -> ``[B, M * bs, H, D]``."""
    b, m = block_tables.shape
    n, bs, h, d = cache.shape
    return cache[block_tables.long()].reshape(b, m * bs, h, d)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    sinks: int = 0,
) -> torch.Tensor:
    """Causal attention of the newest ``T`` tokens of each row over that row's cached tokens.

    q: ``[B, T, Hq, D]``; k_cache, v_cache: ``[N, bs, Hkv, D]`` (already holding the T new
    tokens); block_tables: ``[B, M]`` block ids (columns past a row's length are ignored);
    seq_lens: ``[B]`` tokens in the cache per row, the T new ones included. Query ``t`` of row
    ``b`` sits at position ``seq_lens[b] - T + t`` and sees keys at positions ``<=`` its own
    (and ``> pos - sliding_window`` when a window is set, except the first ``sinks`` cached tokens,
    which stay visible: StreamingLLM's attention sinks). Returns ``[B, T, Hq, D]`` in q's dtype.
    """
    b, t, hq, d = q.shape
    hkv = k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    g = hq // hkv
    k = gather_paged(k_cache, block_tables).float()  # [B, L, Hkv, D]
    v = gather_paged(v_cache, block_tables).float()  # [B, L, Hkv, D]
    L = k.shape[1]
    kpos = torch.arange(L, device=q.device)
    qpos = seq_lens.to(q.device).long()[:, None] - t + torch.arange(t, device=q.device)  # [B, T]
    mask = kpos[None, None, :] <= qpos[:, :, None]  # [B, T, L]
    if sliding_window is not None:
        mask &= (kpos[None, None, :] > qpos[:, :, None] - sliding_window) | (kpos[None, None, :] < sinks)
    qf = q.float().view(b, t, hkv, g, d)
    scores = torch.einsum("bthgd,blhd->bhgtl", qf, k) * scale  # [B, Hkv, G, T, L]
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgtl,blhd->bthgd", p, v)  # [B, T, Hkv, G, D]
    return out.reshape(b, t, hq, d).to(q.dtype)


# -- quantized layouts ----------------------------------------------------------------------------
#
# A quantized layer cache is a :class:`QuantKV`: packed codes plus fp16 scales (and zero points).
# Packed formats put ``per_byte`` values in one byte; byte ``i`` of a token's head vector holds
# dims ``pack_order(D, G, P)[i * P + p]`` for ``p < P`` (low bits first): within each group of
# ``G`` dims, byte ``j`` holds dims ``j, j + G/P, ...``. Kernels unpack a tile to ``[N, D]`` in
# this order and load queries / store outputs through the same permutation.

QMAX = {"fp8": 448.0, "int8": 127.0, "int4": 15.0, "int2": 3.0}
MIN_SCALE = 1e-7  # keeps fp16 scales positive (fp16 subnormals reach 6e-8)


@dataclass
class QuantKV:
    """One layer's paged cache in a quantized format (the tensors kernels read and write).

    kind: "fp8" | "int8" (codes ``[N, bs, H, D]``, scales ``[N, bs, H, 1]``); "int4" (codes
    ``[N, bs, H, D/2]`` uint8, scale/zero ``[N, bs, H, D/G]``); "kivi2" (2-bit codes
    ``[N, bs, H, D/4]``; keys per channel over the block's tokens, scale/zero ``[N, H, D]``;
    values per token, scale/zero ``[N, bs, H, D/G]``; the newest tokens of each sequence, up to
    ``residual`` of them, live in per-row full-precision buffers instead, see :func:`kivi_write_ref`).
    Shapes are logical: the storages (``cache/quant.py``) allocate the per-token tensors as
    :func:`head_major` views and int4 / kivi2 value codes as :func:`token_contiguous` views; code here
    indexes them by (block, token) and kernels take their strides.
    """

    kind: str
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_zero: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None
    group_size: int = 0
    residual: int = 0

    @property
    def per_byte(self) -> int:
        return {"int4": 2, "kivi2": 4}.get(self.kind, 1)

    @property
    def head_dim(self) -> int:
        return self.k.shape[-1] * self.per_byte

    @property
    def group(self) -> int:
        return self.group_size if self.kind in ("int4", "kivi2") else self.head_dim


def token_contiguous(n: int, bs: int, h: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Zeroed value codes ``[N, bs, H, width]`` stored ``[N, H, width, bs]``: the tokens of a block are
    contiguous for each head and byte, so a decode kernel that multiplies ``codes^T [width, tokens]``
    reads them along tokens (a view: index it like the keys, kernels take its strides)."""
    return torch.zeros((n, h, width, bs), dtype=dtype, device=device).permute(0, 3, 1, 2)


def head_major(n: int, bs: int, h: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Zeroed ``[N, bs, H, width]`` stored ``[N, H, bs, width]``: each head's tokens of a block are one
    contiguous run (a view: index it like a contiguous tensor, kernels take its strides)."""
    return torch.zeros((n, h, bs, width), dtype=dtype, device=device).permute(0, 2, 1, 3)


def is_head_major(x: torch.Tensor) -> bool:
    """Whether ``x [N, bs, H, width]`` has the layout of :func:`head_major` inside each block and head
    (a head's tokens one contiguous run); the heads' and blocks' strides are free (:func:`head_chunks`)."""
    n, bs, h, w = x.shape
    return x.stride(1) == w and x.stride(3) == 1 and x.stride(2) >= bs * w and x.stride(0) >= h * x.stride(2)


def head_chunks(n: int, h: int, parts, device) -> list[torch.Tensor]:
    """Zeroed tensors ``[N, bs, H, width]``, one per part ``(bs, width, dtype, token_contiguous)``, whose
    pieces of one block and head lie side by side in one chunk of memory (a ``[N, H, C]`` byte buffer):
    each piece head-major (``[bs, width]``, as :func:`head_major`) or token-contiguous (``[width, bs]``,
    as :func:`token_contiguous`); a part with ``bs`` None is one row per block and head, ``[N, H, width]``
    (kivi2's key channel scales). Views: index them like the other layouts, kernels take their strides."""
    sizes = [(bs or 1) * w * torch.empty((), dtype=dt).element_size() for bs, w, dt, _ in parts]
    buf = torch.zeros((n, h, sum(sizes)), dtype=torch.uint8, device=device)
    out, off = [], 0
    for (bs, w, dt, tc), size in zip(parts, sizes):
        piece = buf[:, :, off:off + size].view(dt)
        out.append(piece if bs is None else piece.unflatten(2, (w, bs)).permute(0, 3, 1, 2) if tc
                   else piece.unflatten(2, (bs, w)).permute(0, 2, 1, 3))
        off += size
    return out


# The order of a chunk's parts (QuantKV fields): the CUDA kernel reads them at these offsets
# (paged_decode.cu, Bulk4 and Bulk2; cuda_decode.chunk_error checks a cache against it).
CHUNK_PARTS = ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")


def as_head_chunks(cache: "QuantKV") -> None:
    """Replace ``cache``'s tensors by copies in one :func:`head_chunks` buffer, parts in
    :data:`CHUNK_PARTS` order, each keeping its in-block layout (A/B runs: ``ab_quant_decode.py ...:chunk``)."""
    names = [x for x in CHUNK_PARTS if getattr(cache, x) is not None]
    olds = [getattr(cache, x) for x in names]
    parts = [(None, x.shape[2], x.dtype, False) if x.dim() == 3  # kivi2's key channel scales [N, H, D]
             else (x.shape[1], x.shape[3], x.dtype, is_token_contiguous(x)) for x in olds]
    n, h, dev = olds[0].shape[0], olds[0].shape[2], olds[0].device
    for name, old, new in zip(names, olds, head_chunks(n, h, parts, dev)):
        setattr(cache, name, new.copy_(old))


def as_token_major(cache: "QuantKV") -> None:
    """Replace ``cache``'s head-major tensors (codes, per-token scales and zeros) by contiguous
    ``[N, bs, H, width]`` copies, the layout before head-major storage (A/B runs and tests: the Triton
    kernels take either by strides; the CUDA kernel is compiled for head-major blocks and refuses them,
    ``cuda_decode.layout_error``)."""
    for name in ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero"):
        x = getattr(cache, name)
        if x is not None and x.dim() == 4 and is_head_major(x):
            setattr(cache, name, x.contiguous())


def is_token_contiguous(codes: torch.Tensor) -> bool:
    """Whether ``codes [N, bs, H, width]`` has the layout of :func:`token_contiguous`."""
    n, bs, h, w = codes.shape
    st = codes.stride()
    return st[1] == 1 and st[3] == bs and st[2] >= w * bs and st[0] >= h * st[2]


def pack_order(d: int, g: int, p: int) -> torch.Tensor:
    """Head-dim index held by unpacked position ``i * p + j`` (byte i, value j). With four values per
    byte (kivi2) bytes 1 and 2 of every 4-byte word trade places (``swap_bytes12``), so that bytes 0
    and 2 of a word hold consecutive dims: the CUDA kernel's fp16 pairs of a word's codes (bytes 0, 2
    and 1, 3) then meet the queries' pairs in dim order (paged_decode.cu, Kivi2Shape::dim)."""
    flat = torch.arange(d)
    i, j = flat // p, flat % p
    if p == 4:
        i = swap_bytes12(i)
    gp = g // p
    return (i // gp) * g + j * gp + i % gp


def swap_bytes12(i: torch.Tensor) -> torch.Tensor:
    """Byte index ``i`` with bytes 1 and 2 of each 4-byte word swapped (its own inverse)."""
    return (i & ~3) | ((i & 1) << 1) | ((i >> 1) & 1)


def _div(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x / c`` correctly rounded on every device: CUDA torch divides by a Python scalar as a
    multiplication by its reciprocal (1 ulp off at times), which would make the reference, and so
    the codes, depend on the device; a tensor divisor takes the IEEE division everywhere (as the
    write kernels do, ``tl.math.div_rn``)."""
    return x / torch.full_like(x, c)


def _quant_token(x: torch.Tensor, kind: str, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x [..., D]`` -> (codes [..., D / per_byte], scale [..., D/G or 1], zero or None)."""
    x = x.float()
    if kind in ("fp8", "int8"):
        amax = x.abs().amax(-1, keepdim=True)
        s = _div(amax, QMAX[kind]).clamp_min(MIN_SCALE).half()
        y = x / s.float()
        if kind == "fp8":
            return y.clamp(-448, 448).to(torch.float8_e4m3fn), s, None
        # Round half away from zero, as the Triton write kernel does.
        y = torch.sign(y) * torch.floor(y.abs() + 0.5)
        return y.clamp(-127, 127).to(torch.int8), s, None
    if kind == "int4":
        d = x.shape[-1]
        xg = x.unflatten(-1, (d // g, g))  # [..., D/G, G]
        mn, mx = xg.amin(-1), xg.amax(-1)
        s = _div(mx - mn, 15.0).clamp_min(MIN_SCALE).half()
        z = mn.half()
        q = torch.floor((xg - z.float()[..., None]) / s.float()[..., None] + 0.5).clamp(0, 15).to(torch.uint8).flatten(-2)
        q = q[..., pack_order(d, g, 2)].unflatten(-1, (d // 2, 2))  # [..., D/2, 2] in byte order
        return q[..., 0] | (q[..., 1] << 4), s, z
    raise ValueError(f"unknown quantized kind {kind!r}")


def _pack(q: torch.Tensor, g: int, p: int) -> torch.Tensor:
    """Integer codes ``[..., D]`` (original dim order) -> bytes ``[..., D / p]``, ``p`` per byte."""
    d, bits = q.shape[-1], 8 // p
    q = q.to(torch.uint8)[..., pack_order(d, g, p)].unflatten(-1, (d // p, p))
    out = q[..., 0]
    for j in range(1, p):
        out = out | (q[..., j] << (bits * j))
    return out


def _unpack(codes: torch.Tensor, g: int, p: int) -> torch.Tensor:
    """Bytes ``[..., D / p]`` -> fp32 codes ``[..., D]`` in original dim order."""
    bits = 8 // p
    q = torch.stack([(codes >> (bits * j)) & ((1 << bits) - 1) for j in range(p)], -1).flatten(-2).float()
    out = torch.empty_like(q)
    out[..., pack_order(q.shape[-1], g, p)] = q
    return out


def _dequant_token(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, kind: str, g: int) -> torch.Tensor:
    if kind in ("fp8", "int8"):
        return codes.float() * s.float()
    if kind in ("int4", "kivi2"):
        q = _unpack(codes, g, 2 if kind == "int4" else 4)
        out = q.unflatten(-1, (q.shape[-1] // g, g)) * s.float()[..., None] + z.float()[..., None]
        return out.flatten(-2)
    raise ValueError(f"unknown quantized kind {kind!r}")


def quant_write_ref(cache: QuantKV, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Quantize new ``k, v [B, T, Hkv, D]`` per token and head and store them at ``slot_mapping [B, T]``."""
    slots = slot_mapping.reshape(-1).long()
    h = k.shape[-2]
    for x, codes, sc, zp in ((k, cache.k, cache.k_scale, cache.k_zero), (v, cache.v, cache.v_scale, cache.v_zero)):
        q, s, z = _quant_token(x.reshape(-1, h, x.shape[-1]), cache.kind, cache.group)
        # Byte views (index_put_ has no float8 kernel on the CPU), indexed by (block, token): the storage
        # is a head-major or token-contiguous view (see head_major, token_contiguous).
        bs = codes.shape[1]
        blk, tok = slots // bs, slots % bs
        codes.view(torch.uint8)[blk, tok] = q.view(torch.uint8)
        sc[blk, tok] = s
        if zp is not None:
            zp[blk, tok] = z


def dequantize_ref(cache: QuantKV) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole cache dequantized to fp32 ``[N, bs, Hkv, D]`` (keys, values; kivi2: the
    quantized blocks only, without the residual window)."""
    if cache.kind == "kivi2":
        k = _unpack(cache.k, cache.group, 4) * cache.k_scale.float()[:, None] + cache.k_zero.float()[:, None]
    else:
        k = _dequant_token(cache.k, cache.k_scale, cache.k_zero, cache.kind, cache.group)
    v = _dequant_token(cache.v, cache.v_scale, cache.v_zero, cache.kind, cache.group)
    return k, v


def quant_paged_attention_ref(q: torch.Tensor, cache: QuantKV, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              scale: float, sliding_window: int | None = None, res_k: torch.Tensor | None = None,
                              res_v: torch.Tensor | None = None, sinks: int = 0) -> torch.Tensor:
    """:func:`paged_attention_ref` over a quantized cache (dequantized first, only the blocks used).
    kivi2 also takes the per-row residual windows ``res_k, res_v [B, R, Hkv, D]``."""
    used = block_tables.long().unique()
    sub = QuantKV(cache.kind, *(t[used] if t is not None else None for t in
                                (cache.k, cache.v, cache.k_scale, cache.v_scale, cache.k_zero, cache.v_zero)),
                  group_size=cache.group_size, residual=cache.residual)
    k, v = dequantize_ref(sub)
    remap = torch.searchsorted(used, block_tables.long())
    if cache.kind == "kivi2":
        return paged_attention_ref(q, *_with_residual(k, v, remap, seq_lens, res_k, res_v, cache.residual),
                                   seq_lens, scale, sliding_window, sinks)
    return paged_attention_ref(q, k, v, remap, seq_lens, scale, sliding_window, sinks)


def merge_splits_ref(part: torch.Tensor, ml: torch.Tensor, splits: int) -> torch.Tensor:
    """Second step of a split decode: ``part [rows * splits, D]`` normalised partial outputs and
    ``ml [rows * splits, 2]`` (running max in log2 units, sum) -> ``[rows, D]`` fp32, each split
    weighted by ``l * 2^(m - max m)`` (what ``decode._combine_splits`` computes)."""
    part = part.float().view(-1, splits, part.shape[-1])
    m, l = ml.float().view(-1, splits, 2).unbind(-1)
    w = torch.where(l > 0, l * torch.exp2(m - m.amax(1, keepdim=True)), torch.zeros_like(l))
    return (part * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-30)


# -- KIVI 2-bit: quantize-on-flush with a full-precision residual window -----------------------------
#
# A row with n cached tokens keeps its newest ``n - F`` tokens (F = n // R * R) in ``res_k/res_v
# [B, R, Hkv, D]`` (fp16); tokens below F sit 2-bit in their paged blocks. When a write completes a
# group of R tokens, the group is quantized once (keys per channel over each block of bs tokens,
# values per token in groups of G dims) and flushed into its blocks. R is a multiple of bs.


def _with_residual(k, v, block_tables, seq_lens, res_k, res_v, r):
    """Each row's cache as one dense block ``[B, M * bs + 1, H, D]`` with its residual tokens written
    over positions ``[F, n)``; returns (k, v, block_tables) for :func:`paged_attention_ref`."""
    kg, vg = gather_paged(k, block_tables), gather_paged(v, block_tables)  # [B, L, H, D]
    b, L = kg.shape[:2]
    n = seq_lens.to(kg.device).long()
    pos = (n // r * r)[:, None] + torch.arange(r, device=kg.device)  # [B, R]
    ok = (pos < n[:, None]) & (pos < L)
    idx = torch.where(ok, pos, L)  # out-of-range rows go to a scratch column
    pad = lambda x: torch.cat([x, x.new_zeros(b, 1, *x.shape[2:])], 1)  # noqa: E731
    kg, vg = pad(kg), pad(vg)
    kg.scatter_(1, idx[:, :, None, None].expand_as(res_k), res_k.float())
    vg.scatter_(1, idx[:, :, None, None].expand_as(res_v), res_v.float())
    bt = torch.arange(b, device=kg.device)[:, None]
    return kg, vg, bt


def _kivi_quant_group(wk: torch.Tensor, wv: torch.Tensor, bs: int, g: int):
    """Quantize ``R`` tokens ``[R, H, D]``: keys per channel over each block of ``bs`` tokens, values
    per token in groups of ``g`` dims. Returns per-block (k codes, ks, kz) and per-token (v codes, vs, vz)."""
    r, h, d = wk.shape
    kb = wk.view(r // bs, bs, h, d)
    mn, mx = kb.amin(1), kb.amax(1)  # [R/bs, H, D]
    ks = _div(mx - mn, 3.0).clamp_min(MIN_SCALE).half()
    kz = mn.half()
    kq = torch.floor((kb - kz.float()[:, None]) / ks.float()[:, None] + 0.5).clamp(0, 3)
    vg = wv.unflatten(-1, (d // g, g))  # [R, H, D/G, G]
    vmn, vmx = vg.amin(-1), vg.amax(-1)
    vs = _div(vmx - vmn, 3.0).clamp_min(MIN_SCALE).half()
    vz = vmn.half()
    vq = torch.floor((vg - vz.float()[..., None]) / vs.float()[..., None] + 0.5).clamp(0, 3).flatten(-2)
    return _pack(kq, g, 4), ks, kz, _pack(vq.view(r // bs, bs, h, d), g, 4), vs.view(r // bs, bs, h, -1), vz.view(r // bs, bs, h, -1)


def kivi_window(k, v, seq_lens, res_k, res_v, r):
    """The tokens of the open groups: residual then new tokens, ``[B, L, H, D]`` fp32 with
    ``L = R * ceil((R + T) / R)``; index ``j`` holds position ``F0 + j`` (F0 = first open position)."""
    b, t = k.shape[:2]
    n0 = seq_lens.long() - t
    off = n0 - n0 // r * r  # [B] residual tokens before this write
    L = r * (-(-(r + t) // r))
    wk = torch.zeros(b, L, *k.shape[2:], device=k.device)
    wv = torch.zeros_like(wk)
    wk[:, :r], wv[:, :r] = res_k.float(), res_v.float()
    idx = (off[:, None] + torch.arange(t, device=k.device))[:, :, None, None].expand(b, t, *k.shape[2:])
    wk.scatter_(1, idx, k.float())
    wv.scatter_(1, idx, v.float())
    return wk, wv


def kivi_update_residual(wk, wv, seq_lens, res_k, res_v, r, t):
    """New residual windows: window tokens from the last open group start (sync-free)."""
    n0 = seq_lens.long() - t
    start = (seq_lens.long() // r * r) - (n0 // r * r)  # [B], offset of the new open group in the window
    idx = (start[:, None] + torch.arange(r, device=wk.device)).clamp_max(wk.shape[1] - 1)
    idx = idx[:, :, None, None].expand(-1, -1, *wk.shape[2:])
    res_k.copy_(wk.gather(1, idx))
    res_v.copy_(wv.gather(1, idx))


def kivi_write_ref(cache: QuantKV, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor,
                   block_tables: torch.Tensor, res_k: torch.Tensor, res_v: torch.Tensor) -> None:
    """Append ``k, v [B, T, H, D]`` to each row (``seq_lens`` counts them already): fill the residual
    window, quantize and flush every group of R tokens it completes into the row's blocks."""
    r, bs, t = cache.residual, cache.k.shape[1], k.shape[1]
    wk, wv = kivi_window(k, v, seq_lens, res_k, res_v, r)
    n1 = seq_lens.long().tolist()
    for b, n in enumerate(n1):
        f0 = (n - t) // r * r
        for gi in range((n // r * r - f0) // r):  # groups completed by this write
            lo = gi * r
            kc, ks, kz, vc, vs, vz = _kivi_quant_group(wk[b, lo:lo + r], wv[b, lo:lo + r], bs, cache.group)
            cols = torch.arange(f0 + lo, f0 + lo + r, bs) // bs
            blk = block_tables[b, cols.to(block_tables.device)].long()
            cache.k[blk], cache.k_scale[blk], cache.k_zero[blk] = kc, ks, kz
            cache.v[blk], cache.v_scale[blk], cache.v_zero[blk] = vc, vs, vz
    kivi_update_residual(wk, wv, seq_lens, res_k, res_v, r, t)
