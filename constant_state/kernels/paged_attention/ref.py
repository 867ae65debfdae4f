"""Reference attention over a paged KV cache, in fp32: the CPU path and the kernels' oracle."""

from __future__ import annotations

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
