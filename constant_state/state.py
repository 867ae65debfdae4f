"""One state interface for every model family.

Each layer declares its memory in a frozen spec (:class:`RecurrentSpec` for constant-size state,
:class:`PagedKVSpec` for a paged KV cache); a :class:`ModelState` holds every layer's state for a
batch of sequences and is updated in place by ``logits, state = model(input_ids, state)``, so its
tensors keep their addresses and a decode step can be captured as a CUDA graph.

Host bookkeeping (:meth:`ModelState.reserve`: block allocation, capacity checks) is separate from
the device work of a forward (:meth:`ModelState.context`, :meth:`ModelState.advance`), which only
reads device tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .cache.block_pool import BlockManager, BlockPool, SeqBlocks
from .cache.formats import KVStorage, get_format


def dtype_nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorSpec:
    """One per-sequence state tensor: name, shape (without the batch dim) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_nbytes(self.dtype)


@dataclass(frozen=True)
class StateSpec:
    """Memory declaration of one layer's state."""

    layer_idx: int

    def bytes_per_sequence(self, num_tokens: int) -> int:
        """Exact bytes this layer holds for one sequence of ``num_tokens`` tokens."""
        raise NotImplementedError


@dataclass(frozen=True)
class RecurrentSpec(StateSpec):
    """Constant-size state (Mamba conv/SSM state, RWKV token shift and wkv state)."""

    kind: str = "recurrent"
    tensors: tuple[TensorSpec, ...] = ()

    @property
    def fixed_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bytes_per_sequence(self, num_tokens: int) -> int:
        return self.fixed_bytes


@dataclass(frozen=True)
class PagedKVSpec(StateSpec):
    """A paged KV cache: blocks of ``block_size`` tokens in format ``kv_format``."""

    num_kv_heads: int = 0
    head_dim: int = 0
    block_size: int = 16
    kv_format: str = "bf16"
    kind: str = "paged_kv"

    def __post_init__(self):
        get_format(self.kv_format)  # unknown format names fail here, naming --kv

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one block of this layer, scales and zero points included."""
        return get_format(self.kv_format).page_bytes(self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> float:
        """Average bytes per cached token in a full block (page_size_bytes / block_size)."""
        return self.page_size_bytes / self.block_size

    @property
    def extra_bytes(self) -> int:
        """Bytes per sequence held outside blocks (e.g. a full-precision residual window)."""
        return get_format(self.kv_format).extra_bytes_per_sequence(self.num_kv_heads, self.head_dim)

    def num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def bytes_per_sequence(self, num_tokens: int) -> int:
        return self.num_blocks(num_tokens) * self.page_size_bytes + self.extra_bytes


class RecurrentState:
    """Per-layer constant-size state: named tensors ``[B, *spec.shape]``."""

    def __init__(self, spec: RecurrentSpec, tensors: dict[str, torch.Tensor]):
        self.spec, self.tensors = spec, tensors

    @classmethod
    def zeros(cls, spec: RecurrentSpec, batch_size: int, device) -> "RecurrentState":
        return cls(spec, {t.name: torch.zeros((batch_size, *t.shape), dtype=t.dtype, device=device)
                          for t in spec.tensors})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def map(self, fn) -> "RecurrentState":
        return RecurrentState(self.spec, {k: fn(v) for k, v in self.tensors.items()})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class PagedKVState:
    """Per-layer handle on the shared paged storage of one attention layer, plus the per-row
    tensors ``rows`` some formats keep beside the blocks (KIVI's residual window ``[B, R, H, D]``)."""

    def __init__(self, spec: PagedKVSpec, storage: KVStorage, rows: dict[str, torch.Tensor] | None = None):
        self.spec, self.storage, self.rows = spec, storage, rows or {}

    @classmethod
    def allocate(cls, spec: PagedKVSpec, storage: KVStorage, batch_size: int, device) -> "PagedKVState":
        return cls(spec, storage, get_format(spec.kv_format).row_tensors(batch_size, spec.num_kv_heads,
                                                                           spec.head_dim, device))

    def map(self, fn) -> "PagedKVState":
        return PagedKVState(self.spec, self.storage, {k: fn(v) for k, v in self.rows.items()})

    def write(self, k: torch.Tensor, v: torch.Tensor, ctx: "ForwardContext") -> None:
        """Store this call's keys/values ``[B, T, Hkv, D]``."""
        if self.rows:
            self.storage.write(k, v, ctx.slot_mapping, seq_lens=ctx.seq_lens, block_tables=ctx.block_tables,
                               **self.rows)
        else:
            self.storage.write(k, v, ctx.slot_mapping)

    def attend(self, q: torch.Tensor, ctx: "ForwardContext", scale: float, sliding_window: int | None) -> torch.Tensor:
        """Attention of ``q [B, T, Hq, D]`` over each row's cache (this call's tokens included);
        with eviction, StreamingLLM's sinks + window mask, or H2O's score accumulation."""
        ev = ctx.extras.get("kv_eviction")
        if ev is None:
            return self.storage.attend(q, ctx.block_tables, ctx.seq_lens, scale, sliding_window, **self.rows)
        policy, scores = ev
        sinks, window = policy.attention_mask()
        if scores is not None:
            from .cache.eviction import accumulate_scores, cached_keys
            accumulate_scores(scores, q, cached_keys(self.storage, ctx.block_tables), ctx.block_tables,
                              ctx.seq_lens, scale)
        return self.storage.attend(q, ctx.block_tables, ctx.seq_lens, scale, window, sinks=sinks, **self.rows)


class KVPool:
    """Block pool bookkeeping plus every paged layer's storage; shared by forked states."""

    def __init__(self, specs: Sequence[PagedKVSpec], num_blocks: int, device, eviction=None):
        sizes = {s.block_size for s in specs}
        if len(sizes) != 1:
            raise ValueError(f"all paged layers must share one block_size, got {sorted(sizes)}")
        self.block_size = sizes.pop()
        self.specs = list(specs)
        self.manager = BlockManager(BlockPool(num_blocks, self.block_size))
        self.storages: dict[int, KVStorage] = {
            s.layer_idx: get_format(s.kv_format).make_storage(num_blocks, s.block_size, s.num_kv_heads,
                                                              s.head_dim, device)
            for s in specs
        }
        # Eviction policy (cache.eviction) and, for H2O, accumulated attention per block.
        self.eviction = eviction
        self.scores = torch.zeros(num_blocks, device=device) if getattr(eviction, "name", "") == "h2o" else None

    @property
    def num_blocks(self) -> int:
        return self.manager.pool.num_blocks

    @property
    def page_bytes_all_layers(self) -> int:
        return sum(s.page_size_bytes for s in self.specs)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            for st in self.storages.values():
                st.copy_blocks(pairs)


@dataclass
class ForwardContext:
    """Per-call values shared by all layers (positions, slot mapping, cross-layer tensors)."""

    positions: torch.Tensor  # [B, T] absolute token positions
    seq_lens: torch.Tensor  # [B] tokens in the state after this call
    num_new: int  # T
    slot_mapping: torch.Tensor | None = None  # [B, T] flat KV slots
    block_tables: torch.Tensor | None = None  # [B, M]
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. RWKV-7's v_first


class ModelState:
    """Every layer's state for a batch of ``B`` sequences, updated in place by the model.

    ``layers[i]`` is a :class:`RecurrentState` or a :class:`PagedKVState`. ``seq_lens`` (device,
    int32 ``[B]``) counts tokens already consumed per row; ``seqs`` mirrors it on the host with
    each row's block table; ``block_tables`` (device, int32 ``[B, M]``) is what kernels read.
    """

    def __init__(self, specs, layers, seqs, seq_lens, kv_pool, block_tables, max_context, device, pos_offset=None):
        self.specs: list[StateSpec] = list(specs)
        self.layers: list[RecurrentState | PagedKVState | None] = layers
        self.seqs: list[SeqBlocks] = seqs
        self.seq_lens: torch.Tensor = seq_lens
        self.kv_pool: KVPool | None = kv_pool
        self.block_tables: torch.Tensor | None = block_tables
        self.max_context: int | None = max_context
        self.device = torch.device(device)
        # Tokens evicted per row (device, int32 [B]): a token's position is its cache index + this.
        self.pos_offset: torch.Tensor = torch.zeros_like(seq_lens) if pos_offset is None else pos_offset

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def allocate(cls, specs: Sequence[StateSpec], batch_size: int, *, max_context: int | None = None,
                 num_blocks: int | None = None, device=None, eviction=None) -> "ModelState":
        """Zero state for ``batch_size`` sequences. Paged layers need ``max_context``; ``eviction`` is
        a policy of :mod:`constant_state.cache.eviction` (None: keep every token)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        device = torch.device(device or "cpu")
        paged = [s for s in specs if isinstance(s, PagedKVSpec)]
        kv_pool = block_tables = None
        if paged:
            if max_context is None or max_context <= 0:
                raise ValueError(f"paged KV layers need max_context (tokens per sequence), got {max_context}")
            bs = paged[0].block_size
            max_blocks = -(-max_context // bs)
            if num_blocks is None:
                num_blocks = batch_size * max_blocks
            kv_pool = KVPool(paged, num_blocks, device, eviction)
            block_tables = torch.zeros((batch_size, max_blocks), dtype=torch.int32, device=device)
        layers: list = []
        for s in specs:
            if isinstance(s, PagedKVSpec):
                layers.append(PagedKVState.allocate(s, kv_pool.storages[s.layer_idx], batch_size, device))
            elif isinstance(s, RecurrentSpec):
                layers.append(RecurrentState.zeros(s, batch_size, device))
            elif s is None:
                layers.append(None)
            else:
                raise TypeError(f"unknown state spec {type(s).__name__} for layer {getattr(s, 'layer_idx', '?')}")
        seqs = [SeqBlocks() for _ in range(batch_size)]
        seq_lens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        return cls(specs, layers, seqs, seq_lens, kv_pool, block_tables, max_context, device)

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    @property
    def seq_lens_host(self) -> list[int]:
        return [s.num_tokens for s in self.seqs]

    @property
    def has_paged(self) -> bool:
        return self.kv_pool is not None

    @property
    def has_row_tensors(self) -> bool:
        return any(isinstance(l, PagedKVState) and l.rows for l in self.layers)

    @property
    def has_recurrent(self) -> bool:
        return any(isinstance(l, RecurrentState) for l in self.layers)

    # -- a forward: host part, then device part -------------------------------------------------
    def reserve(self, num_tokens: int) -> None:
        """Host bookkeeping before a forward of ``num_tokens`` tokens in every row.

        Checks capacity and allocates KV blocks (copy-on-write included); raises before changing
        anything if the context would exceed ``max_context`` or the pool is full.
        """
        if num_tokens <= 0:
            raise ValueError(f"input must have at least one token per row, got {num_tokens}")
        if self.max_context is not None:
            longest = max(s.num_tokens for s in self.seqs) + num_tokens
            if longest > self.max_context:
                raise ValueError(
                    f"context of {longest} tokens exceeds the state's capacity max_context={self.max_context}; "
                    f"create the state with a larger max_context (init_state(max_context=...) / --max-context)"
                )
        if self.kv_pool is None:
            for s in self.seqs:
                s.num_tokens += num_tokens
            return
        if self.kv_pool.eviction is not None:
            self._evict(num_tokens)
        copies, writes = self.kv_pool.manager.reserve(self.seqs, num_tokens)
        self.kv_pool.copy_blocks(copies)
        self._write_block_tables(writes)
        if self.kv_pool.scores is not None and writes:  # fresh blocks start with no attention
            self.kv_pool.scores[torch.tensor([w[2] for w in writes], device=self.device)] = 0.0

    def _evict(self, num_tokens: int) -> None:
        """Drop the blocks the eviction policy no longer needs, before this call's tokens arrive:
        they return to the pool, later blocks move up in the block table (cache indices shift down
        by the dropped tokens), and ``pos_offset`` keeps positions unchanged."""
        from .cache.eviction import plan_evictions

        bs = self.kv_pool.block_size
        plan = plan_evictions(self.kv_pool.eviction, self.seqs, num_tokens, bs, self.kv_pool.scores)
        writes, rows, dropped = [], [], []
        for r, cols in enumerate(plan):
            if not cols:
                continue
            seq = self.seqs[r]
            for c in sorted(cols, reverse=True):
                self.kv_pool.manager.pool.decref(seq.blocks.pop(c))
            seq.num_tokens -= len(cols) * bs
            writes += [(r, c, b) for c, b in enumerate(seq.blocks)]
            rows.append(r)
            dropped.append(len(cols) * bs)
        if rows:
            self._write_block_tables(writes)
            idx = torch.tensor(rows, device=self.device)
            d = torch.tensor(dropped, dtype=self.seq_lens.dtype, device=self.device)
            self.seq_lens.index_add_(0, idx, -d)
            self.pos_offset.index_add_(0, idx, d)

    def _write_block_tables(self, writes: list[tuple[int, int, int]]) -> None:
        if not writes:
            return
        rows, cols, vals = zip(*writes)
        idx = (torch.tensor(rows).to(self.device), torch.tensor(cols).to(self.device))
        self.block_tables.index_put_(idx, torch.tensor(vals, dtype=torch.int32).to(self.device))

    def context(self, num_tokens: int) -> ForwardContext:
        """Device-only per-call values for a forward of ``num_tokens`` tokens (graph-capturable)."""
        idx = self.seq_lens.long()[:, None] + torch.arange(num_tokens, device=self.seq_lens.device)  # [B, T]
        slot = None
        extras = {}
        if self.block_tables is not None:
            bs = self.kv_pool.block_size
            blk = self.block_tables.gather(1, idx // bs).long()  # [B, T]
            slot = blk * bs + idx % bs
            if self.kv_pool.eviction is not None:
                extras["kv_eviction"] = (self.kv_pool.eviction, self.kv_pool.scores)
        pos = idx + self.pos_offset.long()[:, None]  # absolute positions (cache index + evicted tokens)
        return ForwardContext(pos, self.seq_lens + num_tokens, num_tokens, slot, self.block_tables, extras)

    def advance(self, num_tokens: int) -> None:
        """Device side of a finished forward: ``seq_lens += num_tokens`` in place."""
        self.seq_lens.add_(num_tokens)

    # -- views and copies ----------------------------------------------------------------------
    def _derive(self, layers, seqs, seq_lens, block_tables, pos_offset) -> "ModelState":
        return ModelState(self.specs, layers, seqs, seq_lens, self.kv_pool, block_tables,
                          self.max_context, self.device, pos_offset)

    def narrow(self, start: int, length: int) -> "ModelState":
        """Rows ``start:start+length`` as a view: updates through it land in this state."""
        if not (0 <= start and length > 0 and start + length <= self.batch_size):
            raise ValueError(f"rows {start}:{start + length} out of range for batch size {self.batch_size}")
        layers = [l.map(lambda t: t.narrow(0, start, length)) if isinstance(l, (RecurrentState, PagedKVState)) else l
                  for l in self.layers]
        bt = None if self.block_tables is None else self.block_tables.narrow(0, start, length)
        return self._derive(layers, self.seqs[start:start + length], self.seq_lens.narrow(0, start, length), bt,
                            self.pos_offset.narrow(0, start, length))

    def _rows(self, index: Sequence[int] | None) -> list[int]:
        rows = list(range(self.batch_size)) if index is None else [int(i) for i in index]
        bad = [i for i in rows if not 0 <= i < self.batch_size]
        if bad or not rows:
            raise ValueError(f"row index {bad or rows} out of range for batch size {self.batch_size}")
        return rows

    def fork(self, index: Sequence[int] | None = None) -> "ModelState":
        """A new state continuing from these rows (optionally repeated or reordered by ``index``).

        Recurrent tensors are copied; paged rows share their blocks copy-on-write, so forking a
        long prompt costs no KV memory until the forks write into a shared block.
        """
        rows = self._rows(index)
        sel = torch.tensor(rows, device=self.device)
        layers = [l.map(lambda t: t.index_select(0, sel)) if isinstance(l, (RecurrentState, PagedKVState)) else l
                  for l in self.layers]
        if self.kv_pool is not None:
            seqs = [self.kv_pool.manager.fork(self.seqs[i]) for i in rows]
            bt = self.block_tables.index_select(0, sel)
        else:
            seqs, bt = [SeqBlocks([], self.seqs[i].num_tokens) for i in rows], None
        return self._derive(layers, seqs, self.seq_lens.index_select(0, sel), bt, self.pos_offset.index_select(0, sel))

    def clone(self, index: Sequence[int] | None = None) -> "ModelState":
        """Like :meth:`fork`, but paged rows get physical copies of their blocks."""
        rows = self._rows(index)
        if self.kv_pool is None:
            return self.fork(rows)
        sel = torch.tensor(rows, device=self.device)
        manager = self.kv_pool.manager
        need = sum(len(self.seqs[i].blocks) for i in rows)
        if need > manager.pool.num_free:
            manager.pool.allocate(need)  # raises KVCacheFullError, nothing taken
        seqs, pairs = [], []
        for i in rows:
            s, p = manager.copy(self.seqs[i])
            seqs.append(s)
            pairs += p
        self.kv_pool.copy_blocks(pairs)
        bt = torch.zeros((len(rows), self.block_tables.shape[1]), dtype=torch.int32, device=self.device)
        state = self._derive([l.map(lambda t: t.index_select(0, sel)) if isinstance(l, (RecurrentState, PagedKVState)) else l
                              for l in self.layers], seqs, self.seq_lens.index_select(0, sel), bt,
                             self.pos_offset.index_select(0, sel))
        state._write_block_tables([(r, c, b) for r, s in enumerate(seqs) for c, b in enumerate(s.blocks)])
        return state

    def release(self) -> None:
        """Return this state's KV blocks to the pool (the state is empty afterwards)."""
        if self.kv_pool is not None:
            for s in self.seqs:
                self.kv_pool.manager.free(s)
        else:
            for s in self.seqs:
                s.num_tokens = 0
        self.seq_lens.zero_()
        self.pos_offset.zero_()
        for l in self.layers:
            if isinstance(l, RecurrentState):
                for t in l.tensors.values():
                    t.zero_()

    # -- snapshots and prefix sharing -------------------------------------------------------------
    def snapshot(self) -> list[torch.Tensor]:
        """Copies of the device tensors a forward mutates in place, except KV blocks (whose
        writes land in slots already reserved). Used to undo a CUDA-graph warm-up run."""
        return [t.clone() for t in self._mutable()]

    def _mutable(self) -> list[torch.Tensor]:
        """Device tensors a forward updates in place (besides KV blocks)."""
        return [self.seq_lens] + [t for l in self.layers if isinstance(l, RecurrentState) for t in l.tensors.values()] \
            + [t for l in self.layers if isinstance(l, PagedKVState) for t in l.rows.values()] \
            + ([self.kv_pool.scores] if self.kv_pool is not None and self.kv_pool.scores is not None else [])

    def restore(self, snap: list[torch.Tensor]) -> None:
        live = self._mutable()
        for dst, src in zip(live, snap, strict=True):
            dst.copy_(src)

    def share_prefix(self, row: int, token_ids: Sequence[int]) -> int:
        """Attach cached KV blocks holding a prefix of ``token_ids`` to the empty ``row``.

        Only for models whose every layer is paged (a recurrent state cannot skip tokens).
        Returns how many tokens are now in the row (a multiple of the block size, always less
        than ``len(token_ids)`` so that at least one token is left to compute).
        """
        if self.kv_pool is None or self.has_recurrent or self.has_row_tensors:
            raise ValueError("prefix sharing needs a model whose every layer has a paged KV cache "
                             "in a format without per-row tensors (not kivi2)")
        seq = self.seqs[row]
        n = self.kv_pool.manager.match_prefix(seq, token_ids, max_tokens=len(token_ids) - 1)
        if n:
            self._write_block_tables([(row, c, b) for c, b in enumerate(seq.blocks)])
            self.seq_lens[row] = n
        return n

    def register_prefix(self, row: int, token_ids: Sequence[int]) -> None:
        """Index ``row``'s full blocks (holding the start of ``token_ids``) for later sharing."""
        if self.kv_pool is not None and not self.has_recurrent and not self.has_row_tensors:
            self.kv_pool.manager.register_prefix(self.seqs[row], token_ids)

    # -- memory -------------------------------------------------------------------------------
    def num_blocks_held(self) -> int:
        """Distinct KV blocks referenced by these rows (a shared block counts once)."""
        return len({b for s in self.seqs for b in s.blocks})

    def nbytes(self) -> int:
        """Exact bytes of state memory held by these rows.

        Recurrent tensors count in full; paged layers count the distinct blocks these rows
        reference (times each layer's page size) plus per-sequence extras. Block tables and
        sequence lengths (a few ints per row) are metadata and not counted.
        """
        total = sum(l.nbytes() for l in self.layers if isinstance(l, RecurrentState))
        if self.kv_pool is not None:
            total += self.num_blocks_held() * self.kv_pool.page_bytes_all_layers
            total += self.batch_size * sum(s.extra_bytes for s in self.kv_pool.specs)
        return total

    def __repr__(self) -> str:
        kinds = sorted({type(l).__name__ for l in self.layers if l is not None})
        return (f"ModelState(batch_size={self.batch_size}, layers={len(self.layers)} {kinds}, "
                f"seq_lens={self.seq_lens_host}, nbytes={self.nbytes()})")


def spec_bytes_per_sequence(specs: Sequence[StateSpec], num_tokens: int) -> int:
    """Exact state bytes of one sequence of ``num_tokens`` tokens, read off the specs."""
    return sum(s.bytes_per_sequence(num_tokens) for s in specs if s is not None)
