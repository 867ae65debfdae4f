"""RWKV-7 (x070) wkv: fp32 references, Triton chunked prefill and fused recurrent decode, and the dispatch.

:func:`wkv7` is what the model calls: it picks the kernel from the device and the input length
(CUDA: Triton chunked for T >= ``CHUNK_MIN_T``, fused recurrent below; CPU: the PyTorch reference,
chunked for long inputs) and updates the state in place. ``backend`` forces "triton" or "torch".
"""

from __future__ import annotations

import logging

import torch

from .ref import rwkv7_chunk_ref, rwkv7_ref, timemix_core_ref

__all__ = ["rwkv7_ref", "rwkv7_chunk_ref", "timemix_core_ref", "wkv7", "timemix_core", "triton_available",
           "BACKENDS"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
CHUNK_MIN_T = 64
"""From this many tokens the chunked kernels beat the token loop."""

_TRITON: tuple | None = None
_WARNED: set[str] = set()


def triton_available() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            from .chunk import chunk_rwkv7
            from .fused_layer import fused_timemix_rwkv7, timemix_chunked_rwkv7
            from .fused_recurrent import fused_recurrent_rwkv7
            _TRITON = (chunk_rwkv7, fused_recurrent_rwkv7, fused_timemix_rwkv7, timemix_chunked_rwkv7)
        except ImportError as e:
            _TRITON = ()
            _warn_once("import", f"RWKV-7 Triton kernels unavailable ({e}); using the PyTorch reference")
    return bool(_TRITON)


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg)


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"wkv backend expected one of {BACKENDS}, got {backend!r}")
    use = backend == "triton" or (backend == "auto" and x.is_cuda)
    if use and not triton_available():
        if backend == "triton":
            raise ValueError("wkv backend 'triton' requested but triton cannot be imported")
        return False
    return use


def timemix_core(r, k, v, w_lo, a_lo, v_lo, v_first, g, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, eps: float,
                 state: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """RWKV-7's time-mix core (see :func:`timemix_core_ref`); ``state`` is updated in place.

    Triton: short inputs (decode) in one fused kernel; long ones as a fused prologue, the chunked
    kernel and a fused epilogue. PyTorch: the elementwise ops around :func:`wkv7`.
    """
    if _use_triton(backend, r) and state.is_contiguous():
        args = (r, k, v, w_lo, a_lo, v_lo, v_first, g, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, eps, state)
        if r.shape[1] < CHUNK_MIN_T:
            return _TRITON[2](*args)
        return _TRITON[3](*args, wkv=lambda *a: _TRITON[0](*a, inplace=True)[0])
    return timemix_core_ref(r, k, v, w_lo, a_lo, v_lo, v_first, g, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, eps,
                            state, wkv=lambda *args: wkv7(*args, backend=backend))


def wkv7(r, w, k, v, a, b, state: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``o [B, T, H, V]`` of the wkv recurrence; ``state [B, H, K, V]`` (fp32) is updated in place."""
    t = r.shape[1]
    use_triton = _use_triton(backend, r)
    if use_triton and state.is_contiguous():
        chunk_rwkv7, fused_recurrent_rwkv7 = _TRITON[:2]
        fn = chunk_rwkv7 if t >= CHUNK_MIN_T else fused_recurrent_rwkv7
        o, _ = fn(r, w, k, v, a, b, state, inplace=True)
        return o
    if use_triton:
        _warn_once("strided", "wkv7: non-contiguous state, using the PyTorch reference")
    ref = rwkv7_chunk_ref if t >= CHUNK_MIN_T else rwkv7_ref
    o, s = ref(r, w, k, v, a, b, state)
    state.copy_(s)
    return o
