"""Mamba-1 / Mamba-2 ops: pure-PyTorch references (``ref.py``) and the dispatch to mamba-ssm's
CUDA/Triton kernels and causal-conv1d (``backend.py``)."""

from .backend import MambaOps, get_ops, resolve_backend

__all__ = ["MambaOps", "get_ops", "resolve_backend"]
