"""KV storage formats for the paged cache: how a block is laid out, what it costs, how it is read.

A format is a small object with the memory formula (``page_bytes``) and a factory for the
per-layer storage. The dense formats (bf16 / fp16 / fp32) live here; quantized formats register
themselves through :func:`register_format`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..kernels.paged_attention.ref import paged_attention_ref


class KVStorage:
    """Per-layer paged KV storage. Kernels see only block tables, seq lens and slot mappings."""

    fmt: "KVFormat"
    num_blocks: int
    block_size: int

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store new keys/values ``[B, T, Hkv, D]`` at flat slots ``[B, T]``."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               scale: float, sliding_window: int | None = None, sinks: int = 0) -> torch.Tensor:
        """Attention of ``q [B, T, Hq, D]`` (the last T tokens) over each row's cache; with a window,
        the first ``sinks`` cached tokens stay visible."""
        raise NotImplementedError

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` (copy-on-write, clone)."""
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError


class KVFormat:
    """Memory formula and storage factory of one KV cache format."""

    name: str = ""

    def page_bytes(self, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes of one block (keys, values and any scales) for one layer."""
        raise NotImplementedError

    def extra_bytes_per_sequence(self, num_kv_heads: int, head_dim: int) -> int:
        """Bytes held per sequence outside the blocks (e.g. a full-precision residual window)."""
        return 0

    def row_tensors(self, batch_size: int, num_kv_heads: int, head_dim: int, device) -> dict[str, torch.Tensor]:
        """Per-sequence tensors ``[B, ...]`` this format keeps beside its blocks (their bytes are
        ``extra_bytes_per_sequence``); passed by name to ``write`` and ``attend``."""
        return {}

    def make_storage(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                     device: torch.device | str | None) -> KVStorage:
        raise NotImplementedError


class DenseStorage(KVStorage):
    backend: str = "auto"
    """auto: Triton kernels on CUDA, the reference elsewhere; "ref" or "triton" forces one."""

    def __init__(self, fmt: "DenseFormat", num_blocks, block_size, num_kv_heads, head_dim, device):
        self.fmt, self.num_blocks, self.block_size = fmt, num_blocks, block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=fmt.dtype, device=device)  # [N, bs, Hkv, D]
        self.v = torch.zeros(shape, dtype=fmt.dtype, device=device)  # [N, bs, Hkv, D]

    def write(self, k, v, slot_mapping):
        slots = slot_mapping.reshape(-1)
        h, d = self.k.shape[-2:]
        self.k.view(-1, h, d).index_copy_(0, slots, k.reshape(-1, h, d).to(self.k.dtype))
        self.v.view(-1, h, d).index_copy_(0, slots, v.reshape(-1, h, d).to(self.v.dtype))

    def attend(self, q, block_tables, seq_lens, scale, sliding_window=None, sinks=0):
        from .quant import kernels_for

        ops = kernels_for(q.device, self.backend)
        if ops is not None:
            return ops.paged_attention(q, (self.k, self.v), block_tables, seq_lens, scale, sliding_window,
                                       sinks=sinks)
        return paged_attention_ref(q, self.k, self.v, block_tables, seq_lens, scale,
                                   sliding_window=sliding_window, sinks=sinks)

    def copy_blocks(self, pairs):
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.k.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.k.device)
        self.k.index_copy_(0, dst, self.k.index_select(0, src))
        self.v.index_copy_(0, dst, self.v.index_select(0, src))

    def tensors(self):
        return [self.k, self.v]


class DenseFormat(KVFormat):
    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def page_bytes(self, block_size, num_kv_heads, head_dim):
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * block_size * num_kv_heads * head_dim * itemsize

    def make_storage(self, num_blocks, block_size, num_kv_heads, head_dim, device):
        return DenseStorage(self, num_blocks, block_size, num_kv_heads, head_dim, device)


_FORMATS: dict[str, Callable[[], KVFormat]] = {
    "bf16": lambda: DenseFormat("bf16", torch.bfloat16),
    "fp16": lambda: DenseFormat("fp16", torch.float16),
    "fp32": lambda: DenseFormat("fp32", torch.float32),
}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
DTYPE_TO_FORMAT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def register_format(name: str, factory: Callable[[], KVFormat]) -> None:
    _FORMATS[name] = factory


def format_names() -> list[str]:
    return list(_FORMATS)


def get_format(name: str) -> KVFormat:
    key = _ALIASES.get(name, name)
    if key not in _FORMATS:
        raise ValueError(f"unknown KV format {name!r} (--kv / KVConfig.format); expected one of {format_names()}")
    return _FORMATS[key]()


from . import quant as _quant  # noqa: E402,F401  (registers the quantized formats)
