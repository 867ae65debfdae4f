"""Paged-KV bookkeeping in plain Python: block pool, ref counts, per-sequence block tables.

Nothing here touches a tensor (the vLLM v1 split): storage and kernels only see
``block_tables``, ``seq_lens`` and ``slot_mapping``. Every operation that can fail checks first
and mutates after, so a full pool raises :class:`KVCacheFullError` and leaves every sequence as
it was.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence


class KVCacheFullError(RuntimeError):
    """The block pool has too few free blocks for a request. Nothing was changed."""


@dataclass
class SeqBlocks:
    """One sequence's append-only block table and token count."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class BlockPool:
    """Fixed pool of ``num_blocks`` KV blocks with a free list, ref counts and a prefix index.

    Blocks whose ref count drops to zero go back to the free list but keep their content hash
    (if any) until they are handed out again, so a later sequence with the same prefix can still
    pick them up (vLLM's automatic prefix caching, without LRU eviction ordering beyond FIFO).
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._hash_of: dict[int, int] = {}
        self._by_hash: dict[int, int] = {}

    # -- allocation ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks (ref count 1 each), or raise without taking any."""
        if n > len(self._free):
            raise KVCacheFullError(
                f"KV cache pool is full: {n} more block(s) of {self.block_size} tokens needed, "
                f"{len(self._free)} free of num_blocks={self.num_blocks}. Raise num_blocks "
                f"(KVConfig.num_blocks / --kv-blocks) or lower the batch size or context."
            )
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self._hash_of.pop(b, None)
            if h is not None:
                del self._by_hash[h]
            self.ref[b] = 1
            out.append(b)
        return out

    def incref(self, b: int) -> None:
        if self.ref[b] == 0:
            # Reviving a cached free block (prefix hit).
            del self._free[b]
        self.ref[b] += 1

    def decref(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise RuntimeError(f"double free of KV block {b}")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self._free[b] = None

    # -- prefix index -------------------------------------------------------------------------
    def register(self, b: int, h: int) -> None:
        """Record that full block ``b`` holds the tokens hashed to ``h``."""
        if h in self._by_hash or b in self._hash_of:
            return
        self._by_hash[h] = b
        self._hash_of[b] = h

    def lookup(self, h: int) -> int | None:
        return self._by_hash.get(h)

    def check(self) -> None:
        """Internal invariants (used by tests): free list == blocks with ref 0."""
        assert all(r >= 0 for r in self.ref), "negative ref count"
        free = set(self._free)
        assert len(free) == len(self._free)
        assert free == {b for b, r in enumerate(self.ref) if r == 0}, "free list out of sync"
        assert all(self._by_hash[h] == b for b, h in self._hash_of.items())


def block_hashes(token_ids: Sequence[int], block_size: int, n_blocks: int) -> list[int]:
    """Chained content hashes of the first ``n_blocks`` full blocks of ``token_ids``."""
    out, parent = [], 0
    for i in range(n_blocks):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        out.append(parent)
    return out


class BlockManager:
    """Operations on sequences' block tables over one shared :class:`BlockPool`.

    Methods return the storage work the caller must do (block copies for copy-on-write); they
    never touch tensors themselves.
    """

    def __init__(self, pool: BlockPool):
        self.pool = pool

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def blocks_needed(self, seq: SeqBlocks, n_tokens: int) -> tuple[int, bool]:
        """(new blocks to append, whether the last block must be copied first) for n_tokens."""
        bs = self.pool.block_size
        total = -(-(seq.num_tokens + n_tokens) // bs)
        new = max(0, total - len(seq.blocks))
        cow = (
            n_tokens > 0
            and seq.num_tokens % bs != 0
            and self.pool.ref[seq.blocks[seq.num_tokens // bs]] > 1
        )
        return new, cow

    def reserve(self, seqs: Iterable[SeqBlocks], n_tokens: int) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
        """Make room for ``n_tokens`` more tokens in every sequence, atomically.

        Returns ``(copies, writes)``: ``copies`` are (src, dst) block copies the storage must
        perform (copy-on-write of a shared, partly filled last block), ``writes`` are
        (seq_index, column, block) entries changed in the block tables.
        """
        seqs = list(seqs)
        plan = [self.blocks_needed(s, n_tokens) for s in seqs]
        total = sum(new + int(cow) for new, cow in plan)
        if total > self.pool.num_free:
            # Raises KVCacheFullError with the numbers; nothing has been touched.
            self.pool.allocate(total)
        copies, writes = [], []
        for i, (s, (new, cow)) in enumerate(zip(seqs, plan)):
            if cow:
                col = s.num_tokens // self.pool.block_size
                src = s.blocks[col]
                (dst,) = self.pool.allocate(1)
                self.pool.decref(src)
                s.blocks[col] = dst
                copies.append((src, dst))
                writes.append((i, col, dst))
            for b in self.pool.allocate(new):
                writes.append((i, len(s.blocks), b))
                s.blocks.append(b)
            s.num_tokens += n_tokens
        return copies, writes

    def fork(self, seq: SeqBlocks) -> SeqBlocks:
        """A new sequence sharing all of ``seq``'s blocks (copy-on-write)."""
        for b in seq.blocks:
            self.pool.incref(b)
        return SeqBlocks(list(seq.blocks), seq.num_tokens)

    def copy(self, seq: SeqBlocks) -> tuple[SeqBlocks, list[tuple[int, int]]]:
        """A new sequence with its own physical copies of ``seq``'s blocks."""
        dst = self.pool.allocate(len(seq.blocks))
        return SeqBlocks(dst, seq.num_tokens), list(zip(seq.blocks, dst))

    def free(self, seq: SeqBlocks) -> None:
        """Release every block of ``seq`` and empty it."""
        for b in seq.blocks:
            self.pool.decref(b)
        seq.blocks.clear()
        seq.num_tokens = 0

    # -- prefix sharing -----------------------------------------------------------------------
    def match_prefix(self, seq: SeqBlocks, token_ids: Sequence[int], max_tokens: int) -> int:
        """Attach cached full blocks matching the start of ``token_ids`` to the empty ``seq``.

        At most ``max_tokens`` tokens are matched (callers keep at least one token to compute).
        Returns the number of tokens now covered by shared blocks.
        """
        if seq.blocks or seq.num_tokens:
            raise ValueError("match_prefix needs an empty sequence")
        bs = self.pool.block_size
        n = min(len(token_ids), max_tokens) // bs
        for h in block_hashes(token_ids, bs, n):
            b = self.pool.lookup(h)
            if b is None:
                break
            self.pool.incref(b)
            seq.blocks.append(b)
        seq.num_tokens = len(seq.blocks) * bs
        return seq.num_tokens

    def register_prefix(self, seq: SeqBlocks, token_ids: Sequence[int]) -> None:
        """Index the full blocks of ``seq`` (which holds ``token_ids``) for later sharing."""
        bs = self.pool.block_size
        n = min(len(token_ids), seq.num_tokens) // bs
        for b, h in zip(seq.blocks, block_hashes(token_ids, bs, n)):
            self.pool.register(b, h)
