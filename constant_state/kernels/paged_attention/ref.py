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
) -> torch.Tensor:
    """Causal attention of the newest ``T`` tokens of each row over that row's cached tokens.

    q: ``[B, T, Hq, D]``; k_cache, v_cache: ``[N, bs, Hkv, D]`` (already holding the T new
    tokens); block_tables: ``[B, M]`` block ids (columns past a row's length are ignored);
    seq_lens: ``[B]`` tokens in the cache per row, the T new ones included. Query ``t`` of row
    ``b`` sits at position ``seq_lens[b] - T + t`` and sees keys at positions ``<=`` its own
    (and ``> pos - sliding_window`` when a window is set). Returns ``[B, T, Hq, D]`` in q's dtype.
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
        mask &= kpos[None, None, :] > qpos[:, :, None] - sliding_window
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

    kind: "fp8" | "int8" (codes ``[N, bs, H, D]``, scales ``[N, bs, H, 1]``), "int4" (codes
    ``[N, bs, H, D/2]`` uint8, scale/zero ``[N, bs, H, D/G]``). ``v_group`` is G for values,
    ``k_group`` for keys (int4 uses one group size for both).
    """

    kind: str
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_zero: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None
    group_size: int = 0

    @property
    def per_byte(self) -> int:
        return 2 if self.kind == "int4" else 1

    @property
    def head_dim(self) -> int:
        return self.k.shape[-1] * self.per_byte

    @property
    def group(self) -> int:
        return self.group_size if self.kind == "int4" else self.head_dim


def pack_order(d: int, g: int, p: int) -> torch.Tensor:
    """Head-dim index held by unpacked position ``i * p + j`` (byte i, value j)."""
    flat = torch.arange(d)
    i, j = flat // p, flat % p
    gp = g // p
    return (i // gp) * g + j * gp + i % gp


def _quant_token(x: torch.Tensor, kind: str, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x [..., D]`` -> (codes [..., D / per_byte], scale [..., D/G or 1], zero or None)."""
    x = x.float()
    if kind in ("fp8", "int8"):
        amax = x.abs().amax(-1, keepdim=True)
        s = (amax / QMAX[kind]).clamp_min(MIN_SCALE).half()
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
        s = ((mx - mn) / 15).clamp_min(MIN_SCALE).half()
        z = mn.half()
        q = torch.floor((xg - z.float()[..., None]) / s.float()[..., None] + 0.5).clamp(0, 15).to(torch.uint8).flatten(-2)
        q = q[..., pack_order(d, g, 2)].unflatten(-1, (d // 2, 2))  # [..., D/2, 2] in byte order
        return q[..., 0] | (q[..., 1] << 4), s, z
    raise ValueError(f"unknown quantized kind {kind!r}")


def _dequant_token(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, kind: str, g: int) -> torch.Tensor:
    if kind in ("fp8", "int8"):
        return codes.float() * s.float()
    if kind == "int4":
        d = codes.shape[-1] * 2
        q = torch.stack([codes & 15, codes >> 4], -1).flatten(-2).float()  # [..., D] in byte order
        out = torch.empty_like(q)
        out[..., pack_order(d, g, 2)] = q
        out = out.unflatten(-1, (d // g, g)) * s.float()[..., None] + z.float()[..., None]
        return out.flatten(-2)
    raise ValueError(f"unknown quantized kind {kind!r}")


def quant_write_ref(cache: QuantKV, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Quantize new ``k, v [B, T, Hkv, D]`` per token and head and store them at ``slot_mapping [B, T]``."""
    slots = slot_mapping.reshape(-1).long()
    h = k.shape[-2]
    for x, codes, sc, zp in ((k, cache.k, cache.k_scale, cache.k_zero), (v, cache.v, cache.v_scale, cache.v_zero)):
        q, s, z = _quant_token(x.reshape(-1, h, x.shape[-1]), cache.kind, cache.group)
        # Byte views: index_copy_ has no float8 kernel on the CPU.
        codes.view(torch.uint8).view(-1, *codes.shape[2:]).index_copy_(0, slots, q.view(torch.uint8))
        sc.view(-1, *sc.shape[2:]).index_copy_(0, slots, s)
        if zp is not None:
            zp.view(-1, *zp.shape[2:]).index_copy_(0, slots, z)


def dequantize_ref(cache: QuantKV) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole cache dequantized to fp32 ``[N, bs, Hkv, D]`` (keys, values)."""
    k = _dequant_token(cache.k, cache.k_scale, cache.k_zero, cache.kind, cache.group)
    v = _dequant_token(cache.v, cache.v_scale, cache.v_zero, cache.kind, cache.group)
    return k, v


def quant_paged_attention_ref(q: torch.Tensor, cache: QuantKV, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """:func:`paged_attention_ref` over a quantized cache (dequantized first, only the blocks used)."""
    used = block_tables.long().unique()
    sub = QuantKV(cache.kind, *(t[used] if t is not None else None for t in
                                (cache.k, cache.v, cache.k_scale, cache.v_scale, cache.k_zero, cache.v_zero)),
                  group_size=cache.group_size)
    k, v = dequantize_ref(sub)
    remap = torch.searchsorted(used, block_tables.long())
    return paged_attention_ref(q, k, v, remap, seq_lens, scale, sliding_window)
