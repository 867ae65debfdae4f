"""Quantized paged KV formats: FP8 e4m3 and INT8 per token and head, INT4 group-wise along the head dim.

Quantization happens once, when a token is written (``write``); history is never re-quantized.
Every block holds its codes plus fp16 scales (and zero points), and ``page_bytes`` counts all of
them. On CUDA the storages run the Triton kernels of ``kernels/paged_attention``; elsewhere, or
with ``storage.backend = "ref"``, the pure-PyTorch references.

Memory per token, per layer (H KV heads, head dim D, group G), keys plus values:

- fp8, int8: ``2 * H * (D + 2)`` bytes (one fp16 scale per token and head);
- int4-gG:   ``2 * H * (D / 2 + 4 * D / G)`` bytes (fp16 scale and fp16 zero per group);
- kivi2 (block size bs, value group G, residual window R): per block ``2 * bs * H * D / 4`` bytes of
  codes + ``4 * H * D`` (key scale and zero per channel) + ``4 * bs * H * D / G`` (value scale and
  zero per token group); per sequence ``4 * R * H * D`` bytes of fp16 residual keys and values.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import torch

from ..kernels.paged_attention.ref import (CHUNK_PARTS, QuantKV, head_chunks, head_major, kivi_update_residual, kivi_window,
                                           kivi_write_ref, quant_paged_attention_ref, quant_write_ref,
                                           token_contiguous)
from .formats import _ALIASES, KVFormat, KVStorage, format_names, register_format

log = logging.getLogger(__name__)
_warned: set[str] = set()
BACKENDS = ("auto", "triton", "ref")


def warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def kernels_for(device: torch.device, backend: str = "auto"):
    """The Triton kernel module when ``backend`` and ``device`` call for it, else None (reference)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "ref" or (backend == "auto" and device.type != "cuda"):
        return None
    try:
        from ..kernels.paged_attention import decode, prefill, write
    except ImportError as e:  # triton missing: loud once, then the reference
        if backend == "triton":
            raise
        warn_once(f"Triton paged-attention kernels unavailable ({e}); using the PyTorch reference")
        return None
    return _Ops(decode.paged_attention, prefill.paged_prefill, write.quant_write, write.kivi_flush)


class _Ops(NamedTuple):
    decode: Callable
    prefill: Callable
    quant_write: Callable
    kivi_flush: Callable

    def paged_attention(self, q, cache, block_tables, seq_lens, scale, sliding_window=None, **rows):
        fn = self.decode if q.shape[1] == 1 else self.prefill
        return fn(q, cache, block_tables, seq_lens, scale, sliding_window, **rows)


class QuantStorage(KVStorage):
    """Per-layer storage of one quantized format: a :class:`QuantKV` over ``num_blocks`` blocks."""

    backend: str = "auto"

    def __init__(self, fmt: "QuantFormat", num_blocks, block_size, num_kv_heads, head_dim, device):
        self.fmt, self.num_blocks, self.block_size = fmt, num_blocks, block_size
        n, bs, h, d = num_blocks, block_size, num_kv_heads, head_dim
        # Codes and scales head-major: each head's tokens of a block are one run (H200, batch 32 / 32k, CUDA
        # kernel: fp8 550 -> 537 us, int8 572 -> 552, int4 437 -> 425, kivi2 513 -> 504; Triton fp8 728 -> 713).
        codes = lambda: head_major(n, bs, h, d // fmt.per_byte, fmt.code_dtype, device)  # noqa: E731
        scales = lambda: head_major(n, bs, h, fmt.groups(d), torch.float16, device)  # noqa: E731
        zeros = (lambda: scales()) if fmt.has_zero else (lambda: None)
        # int4 values token-contiguous within a block (H200, batch 32 / 32k: 785 -> 690 us; kivi2 too);
        # fp8 / int8 values laid out like the keys (token-contiguous: 740 -> 898 us, 800 -> 1026 us).
        vcodes = (token_contiguous(n, bs, h, d // fmt.per_byte, fmt.code_dtype, device) if fmt.per_byte == 2
                  else codes())
        if fmt.chunked(bs, d):
            # one chunk per block and head (ref.head_chunks), which the CUDA kernel copies whole into shared
            # memory (cuda_decode.bulk_for; H200, batch 32 / 32k: 328 -> 310 to 312 us): same bytes
            w, g = d // 2, fmt.groups(d)
            parts = head_chunks(n, h, [(bs, w, torch.uint8, False), (bs, w, torch.uint8, True)]
                                + [(bs, g, torch.float16, False)] * 4, device)
            self.cache = QuantKV(fmt.kind, **dict(zip(CHUNK_PARTS, parts)), group_size=fmt.group_for(d))
            return
        self.cache = QuantKV(fmt.kind, codes(), vcodes, scales(), scales(), zeros(), zeros(),
                             group_size=fmt.group_for(d))

    def write(self, k, v, slot_mapping):
        ops = kernels_for(k.device, self.backend)
        (ops.quant_write if ops else quant_write_ref)(self.cache, k, v, slot_mapping)

    def attend(self, q, block_tables, seq_lens, scale, sliding_window=None, sinks=0):
        ops = kernels_for(q.device, self.backend)
        if ops is None:
            return quant_paged_attention_ref(q, self.cache, block_tables, seq_lens, scale, sliding_window,
                                             sinks=sinks)
        return ops.paged_attention(q, self.cache, block_tables, seq_lens, scale, sliding_window, sinks=sinks)

    def copy_blocks(self, pairs):
        if not pairs:
            return
        dev = self.cache.k.device
        src = torch.tensor([p[0] for p in pairs], device=dev)
        dst = torch.tensor([p[1] for p in pairs], device=dev)
        for t in self.tensors():
            t = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
            t.index_copy_(0, dst, t.index_select(0, src))

    def tensors(self):
        c = self.cache
        return [t for t in (c.k, c.v, c.k_scale, c.v_scale, c.k_zero, c.v_zero) if t is not None]


class KiviStorage(QuantStorage):
    """KIVI 2-bit: blocks hold flushed groups; each row's newest tokens sit in ``res_k/res_v``."""

    def write(self, k, v, slot_mapping, *, seq_lens, block_tables, res_k, res_v):
        ops = kernels_for(k.device, self.backend)
        if ops is None:
            kivi_write_ref(self.cache, k, v, seq_lens, block_tables, res_k, res_v)
            return
        wk, wv = kivi_window(k, v, seq_lens, res_k, res_v, self.cache.residual)
        ops.kivi_flush(self.cache, wk, wv, seq_lens, block_tables, k.shape[1])
        kivi_update_residual(wk, wv, seq_lens, res_k, res_v, self.cache.residual, k.shape[1])

    def attend(self, q, block_tables, seq_lens, scale, sliding_window=None, sinks=0, *, res_k, res_v):
        ops = kernels_for(q.device, self.backend)
        if ops is None:
            return quant_paged_attention_ref(q, self.cache, block_tables, seq_lens, scale, sliding_window,
                                             res_k, res_v, sinks=sinks)
        return ops.paged_attention(q, self.cache, block_tables, seq_lens, scale, sliding_window, sinks=sinks,
                                   res_k=res_k, res_v=res_v)


class KiviFormat(KVFormat):
    """KIVI 2-bit (Liu et al. 2024): keys per channel over each block, values per token in groups
    of G dims, asymmetric with fp16 scale and zero; the newest < R tokens of a row stay fp16."""

    per_byte, has_zero, code_dtype, kind = 4, True, torch.uint8, "kivi2"

    def __init__(self, group_size: int = 64, residual: int = 128):
        self.group_size, self.residual = group_size, residual
        self.name = kivi_name(group_size, residual)

    def group_for(self, head_dim: int) -> int:
        g = min(self.group_size, head_dim)
        if head_dim % g or g % 4:
            raise ValueError(f"{self.name}: head_dim {head_dim} must be a multiple of the group size {g} "
                             f"(--kv-group-size)")
        return g

    def chunked(self, block_size: int, head_dim: int) -> bool:
        """Whether a block's codes, channel scales, value scales and zero points of one KV head lie in one
        chunk of memory (``ref.head_chunks``, parts in ``ref.CHUNK_PARTS`` order): 32- and 64-token blocks,
        which the CUDA decode kernel copies whole (``cuda_decode.bulk_for``)."""
        return block_size in (32, 64)

    def page_bytes(self, block_size, num_kv_heads, head_dim):
        g = self.group_for(head_dim)
        codes = 2 * block_size * num_kv_heads * head_dim // 4
        return codes + 2 * 2 * num_kv_heads * head_dim + 2 * 2 * block_size * num_kv_heads * (head_dim // g)

    def extra_bytes_per_sequence(self, num_kv_heads, head_dim):
        return 2 * self.residual * num_kv_heads * head_dim * 2

    def row_tensors(self, batch_size, num_kv_heads, head_dim, device):
        shape = (batch_size, self.residual, num_kv_heads, head_dim)
        return {"res_k": torch.zeros(shape, dtype=torch.float16, device=device),
                "res_v": torch.zeros(shape, dtype=torch.float16, device=device)}

    def make_storage(self, num_blocks, block_size, num_kv_heads, head_dim, device):
        if self.residual % block_size:
            raise ValueError(f"{self.name}: the residual window ({self.residual}, --kv-residual) must be a "
                             f"multiple of the block size ({block_size}, --kv-block-size)")
        st = KiviStorage.__new__(KiviStorage)
        st.fmt, st.num_blocks, st.block_size = self, num_blocks, block_size
        n, bs, h, d = num_blocks, block_size, num_kv_heads, head_dim
        g = self.group_for(d)
        z = lambda *shape, dt=torch.float16: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
        # values token-contiguous within a block (H200, batch 32 / 32k: 826 -> 784 us)
        # key codes and value scales head-major (as QuantStorage)
        vsc = lambda: head_major(n, bs, h, d // g, torch.float16, device)  # noqa: E731
        if self.chunked(bs, d):
            # one chunk per block and head (ref.head_chunks; the key channel scales and zero points [N, H, D]),
            # which the CUDA kernel copies whole into shared memory (cuda_decode.bulk_for): same bytes
            parts = head_chunks(n, h, [(bs, d // 4, torch.uint8, False), (bs, d // 4, torch.uint8, True)]
                                + [(None, d, torch.float16, False)] * 2 + [(bs, d // g, torch.float16, False)] * 2,
                                device)
            st.cache = QuantKV("kivi2", **dict(zip(CHUNK_PARTS, parts)), group_size=g, residual=self.residual)
            return st
        st.cache = QuantKV("kivi2", head_major(n, bs, h, d // 4, torch.uint8, device),
                           token_contiguous(n, bs, h, d // 4, torch.uint8, device),
                           z(n, h, d), vsc(), z(n, h, d), vsc(), group_size=g, residual=self.residual)
        return st


DEFAULT_KIVI_GROUP, DEFAULT_KIVI_RESIDUAL = 64, 128


def kivi_name(group_size: int = DEFAULT_KIVI_GROUP, residual: int = DEFAULT_KIVI_RESIDUAL) -> str:
    """Format name of KIVI 2-bit with these settings, registered on first use (``kivi2-g32-r64``)."""
    if group_size not in (32, 64, 128):
        raise ValueError(f"KVConfig.group_size (--kv-group-size) must be 32, 64 or 128 for kivi2, got {group_size}")
    if residual <= 0:
        raise ValueError(f"KVConfig.residual_window (--kv-residual) must be positive, got {residual}")
    name = "kivi2" + (f"-g{group_size}" if group_size != DEFAULT_KIVI_GROUP else "") + \
        (f"-r{residual}" if residual != DEFAULT_KIVI_RESIDUAL else "")
    if name not in format_names():
        register_format(name, lambda: KiviFormat(group_size, residual))
    return name


class QuantFormat(KVFormat):
    """fp8 / int8 (one fp16 scale per token and head) or int4 (fp16 scale + zero per group of dims)."""

    def __init__(self, kind: str, group_size: int = 0):
        self.kind, self.group_size = kind, group_size
        self.name = f"{kind}-g{group_size}" if kind == "int4" and group_size != DEFAULT_INT4_GROUP else kind
        self.per_byte = 2 if kind == "int4" else 1
        self.has_zero = kind == "int4"
        self.code_dtype = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8}[kind]

    def group_for(self, head_dim: int) -> int:
        """Dims per scale group: the format's group size, or the whole head if that is smaller."""
        g = min(self.group_size, head_dim) if self.kind == "int4" else head_dim
        if head_dim % g or g % 2:
            raise ValueError(f"{self.name}: head_dim {head_dim} must be a multiple of the group size "
                             f"{g} (--kv-group-size)")
        return g

    def groups(self, head_dim: int) -> int:
        """Scale groups per token and head."""
        return head_dim // self.group_for(head_dim) if self.kind == "int4" else 1

    def chunked(self, block_size: int, head_dim: int) -> bool:
        """Whether a block's codes, scales and zero points of one KV head lie in one chunk of memory
        (``ref.head_chunks``, parts in ``ref.CHUNK_PARTS`` order): int4 (groups of 32 or 64) in 16-token
        blocks, the layout whose chunks the CUDA decode kernel copies whole (``cuda_decode.bulk_for``);
        else one tensor each."""
        return self.kind == "int4" and self.group_for(head_dim) in (32, 64) and block_size == 16

    def page_bytes(self, block_size, num_kv_heads, head_dim):
        per_head = head_dim // self.per_byte + 2 * self.groups(head_dim) * (2 if self.has_zero else 1)
        return 2 * block_size * num_kv_heads * per_head

    def make_storage(self, num_blocks, block_size, num_kv_heads, head_dim, device):
        return QuantStorage(self, num_blocks, block_size, num_kv_heads, head_dim, device)


INT4_GROUPS = (32, 64)
DEFAULT_INT4_GROUP = 64

register_format("fp8", lambda: QuantFormat("fp8"))
register_format("int8", lambda: QuantFormat("int8"))
register_format("int4", lambda: QuantFormat("int4", DEFAULT_INT4_GROUP))
register_format("int4-g32", lambda: QuantFormat("int4", 32))
_ALIASES[f"int4-g{DEFAULT_INT4_GROUP}"] = "int4"


def int4_name(group_size: int) -> str:
    """Format name of int4 with ``group_size`` dims per scale."""
    if group_size not in INT4_GROUPS:
        raise ValueError(f"KVConfig.group_size (--kv-group-size) must be one of {INT4_GROUPS} for int4, got {group_size}")
    return "int4" if group_size == DEFAULT_INT4_GROUP else f"int4-g{group_size}"

register_format("kivi2", lambda: KiviFormat())
