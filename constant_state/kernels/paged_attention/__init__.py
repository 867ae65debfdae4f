"""Attention over a paged KV cache: the pure-PyTorch reference (CPU path, test oracle)."""

from .ref import paged_attention_ref

__all__ = ["paged_attention_ref"]
