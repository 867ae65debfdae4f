"""Prefill over a paged cache: ``T`` new tokens attend to the cached prefix and to themselves.

The new tokens' K/V are written first (``write.quant_write`` or a dense copy), so the cache
already holds them; the attention kernel is the one of ``decode.py`` launched with query tiles
of ``BLOCK_T`` tokens x all query heads of one KV head and no context split (the tokens
themselves give enough programs). Causality and the sliding window are applied per query row
from ``seq_lens`` read on the device.
"""

from __future__ import annotations

import torch

from .decode import paged_attention


def paged_prefill(q: torch.Tensor, cache, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                  sliding_window: int | None = None, res_k: torch.Tensor | None = None,
                  res_v: torch.Tensor | None = None, sinks: int = 0) -> torch.Tensor:
    """Triton twin of ``paged_attention_ref`` / ``quant_paged_attention_ref`` for ``T >= 1`` new tokens."""
    return paged_attention(q, cache, block_tables, seq_lens, scale, sliding_window, num_splits=1,
                           res_k=res_k, res_v=res_v, sinks=sinks)
