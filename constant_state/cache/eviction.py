"""Evicting paged KV caches: StreamingLLM (attention sinks + recent window) and H2O (heavy hitters).

Eviction works on whole blocks, in the host bookkeeping before a forward (``plan``): a block that
no query of this call or later can need is unlinked from the row's block table and returned to
the pool, so memory stays bounded by the window (or budget) plus a block or two. Attention then
runs over the remaining blocks with the same kernels; StreamingLLM's exact token-level
"first S tokens + last W tokens" rule is applied as a mask (``sinks`` + ``sliding_window`` in
cache-index space), H2O attends to every kept token.

Positions: keys are cached *after* RoPE at their original absolute positions, and each query is
rotated at its own absolute position (``ModelState.pos_offset`` counts the evicted tokens of a
row so that ``positions = seq_lens + pos_offset``). Every kept (query, key) pair therefore has
exactly the relative distance it has without eviction, at no cost in the kernels, and this
composes with every quantized format (keys are quantized once, rotated). StreamingLLM's
alternative, positions re-numbered inside the cache, exists to run past the trained context
length; it needs pre-RoPE keys rotated in the kernel at every step and changes what a kept pair
"sees"; we do not need it for contexts within the model's range (see docs/kv_cache.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .block_pool import SeqBlocks


@dataclass(frozen=True)
class StreamingLLM:
    """Keep the first ``sinks`` tokens and the last ``window`` tokens of each row."""

    sinks: int = 4
    window: int = 1020
    name = "streaming"

    def attention_mask(self) -> tuple[int, int]:
        """(sinks, sliding window) in cache-index space for the attention kernels."""
        return self.sinks, self.window

    def droppable(self, seq: SeqBlocks, n_new: int, bs: int, scores=None) -> list[int]:
        """Block columns of ``seq`` no query of the next ``n_new`` tokens (or later) attends to."""
        first_q = seq.num_tokens  # cache index of this call's first query
        keep_from = first_q - self.window + 1  # the first query sees indices >= keep_from
        sink_cols = -(-self.sinks // bs)
        return [c for c in range(sink_cols, len(seq.blocks)) if (c + 1) * bs <= keep_from]


@dataclass(frozen=True)
class H2O:
    """Keep at most ``budget`` tokens: the last ``recent`` ones plus the blocks with the largest
    accumulated attention (summed over layers, heads, queries and the block's tokens)."""

    budget: int = 1024
    recent: int = 512
    name = "h2o"

    def attention_mask(self) -> tuple[int, None]:
        return 0, None

    def droppable(self, seq: SeqBlocks, n_new: int, bs: int, scores: list[float] | None = None) -> list[int]:
        first_q = seq.num_tokens
        if first_q + n_new <= self.budget:
            return []
        recent_from = max(0, first_q - self.recent + 1) // bs  # columns holding the recent window
        old = list(range(recent_from))
        n_heavy = max(0, (self.budget - self.recent) // bs)
        if len(old) <= n_heavy:
            return []
        ranked = sorted(old, key=lambda c: scores[seq.blocks[c]], reverse=True)  # heaviest first
        return sorted(ranked[n_heavy:])


Policy = StreamingLLM | H2O


def make_policy(kind: str, *, sinks: int | None, window: int | None, budget: int | None) -> Policy | None:
    """The eviction policy of a KV config (``none`` -> None). Errors name the flag to change."""
    if kind == "none":
        return None
    if kind == "streaming":
        p = StreamingLLM(4 if sinks is None else sinks, 1020 if window is None else window)
        if p.sinks < 0 or p.window < 1:
            raise ValueError(f"--kv-sinks must be >= 0 and --kv-window >= 1, got {p.sinks} and {p.window}")
        return p
    if kind == "h2o":
        b = 1024 if budget is None else budget
        p = H2O(b, b // 2 if window is None else window)
        if not 0 < p.recent <= p.budget:
            raise ValueError(f"--kv-window (H2O recent tokens) must be in (0, --kv-budget={p.budget}], got {p.recent}")
        return p
    raise ValueError(f"KVConfig.eviction (--kv-eviction) must be none, streaming or h2o, got {kind!r}")


def plan_evictions(policy: Policy, seqs: Sequence[SeqBlocks], n_new: int, bs: int,
                   scores: torch.Tensor | None) -> list[list[int]]:
    """Per row, the block columns to drop before a forward of ``n_new`` tokens."""
    host = scores.tolist() if scores is not None and isinstance(policy, H2O) else None
    return [policy.droppable(s, n_new, bs, host) for s in seqs]


@torch.no_grad()
def accumulate_scores(scores: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float) -> None:
    """H2O: add this call's attention probabilities to ``scores [num_blocks]`` per block.

    ``keys [B, L, Hkv, D]`` are the rows' cached keys (dequantized, in block-table order). The
    probabilities are summed over query heads, this call's queries and the block's tokens.
    Sync-free torch (capturable); the cache it reads is bounded by the budget.
    """
    b, t, hq, d = q.shape
    hkv = keys.shape[2]
    L = keys.shape[1]
    kpos = torch.arange(L, device=q.device)
    qpos = seq_lens.long()[:, None] - t + torch.arange(t, device=q.device)  # [B, T]
    mask = kpos[None, None] <= qpos[:, :, None]  # [B, T, L]
    s = torch.einsum("bthgd,blhd->bthgl", q.float().view(b, t, hkv, hq // hkv, d), keys.float()) * scale
    p = s.masked_fill(~mask[:, :, None, None], float("-inf")).softmax(-1)
    per_tok = p.sum(dim=(1, 2, 3))  # [B, L]
    bs = L // block_tables.shape[1]
    per_blk = per_tok.view(b, -1, bs).sum(-1)  # [B, M]
    scores.index_add_(0, block_tables.long().reshape(-1), per_blk.reshape(-1))


def cached_keys(storage, block_tables: torch.Tensor) -> torch.Tensor:
    """Keys of every row, fp32 ``[B, M * bs, Hkv, D]`` in block-table order (dequantized)."""
    from ..kernels.paged_attention.ref import _dequant_token, gather_paged

    cache = getattr(storage, "cache", None)
    if cache is None:
        return gather_paged(storage.k, block_tables).float()
    b, m = block_tables.shape
    idx = block_tables.long().reshape(-1)
    zero = cache.k_zero[idx] if cache.k_zero is not None else None
    k = _dequant_token(cache.k[idx], cache.k_scale[idx], zero, cache.kind, cache.group)  # [B*M, bs, H, D]
    return k.reshape(b, -1, *k.shape[2:])
