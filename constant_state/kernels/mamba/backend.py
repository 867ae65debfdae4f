"""The one place that imports mamba-ssm and causal-conv1d; picks the backend of the Mamba ops.

Backends: ``"cuda"`` (mamba-ssm's ``selective_scan_fn``, ``mamba_chunk_scan_combined``,
``selective_state_update``, its gated RMSNorm, and causal-conv1d's ``causal_conv1d_fn`` /
``causal_conv1d_update``) and ``"ref"`` (our fp32 PyTorch references, any device). Choice, first
match wins: the ``backend`` argument of :func:`get_ops` (``MambaLM.set_backend``), the environment
variable ``CONSTANT_STATE_MAMBA_BACKEND`` (``ref``, ``cuda`` or ``auto``), then ``auto``: the CUDA
kernels on a CUDA device when they import, else the reference. Falling back on a CUDA device warns
once, loudly, naming what is missing; a forced ``cuda`` that cannot run raises.
"""

from __future__ import annotations

import logging
import os
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import ref
from .state_correction import continue_from_state

log = logging.getLogger(__name__)

ENV_VAR = "CONSTANT_STATE_MAMBA_BACKEND"
BACKENDS = ("auto", "ref", "cuda")
_warned: set[str] = set()


@lru_cache(maxsize=None)
def _import_kernels() -> tuple[dict, dict[str, str]]:
    """(callables by name, import errors by package). Never raises."""
    found, errors = {}, {}
    try:
        # `import mamba_ssm` imports its compiled selective_scan_cuda unconditionally: it fails on
        # machines without the extension, and so on every CPU-only machine.
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        found.update(selective_scan_fn=selective_scan_fn, selective_state_update=selective_state_update,
                     mamba_chunk_scan_combined=mamba_chunk_scan_combined, rmsnorm_fn=rmsnorm_fn)
    except ImportError as e:
        errors["mamba_ssm"] = f"{type(e).__name__}: {e}"
    else:
        try:  # the fused residual-add + RMSNorm (module renamed across mamba-ssm versions)
            from mamba_ssm.ops.triton.layer_norm import layer_norm_fn
        except ImportError:
            try:
                from mamba_ssm.ops.triton.layernorm import layer_norm_fn
            except ImportError as e:
                log.info("mamba-ssm has no fused add + RMSNorm here (%s); using PyTorch ops", e)
                layer_norm_fn = None
        if layer_norm_fn is not None:
            found["layer_norm_fn"] = layer_norm_fn
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        found.update(causal_conv1d_fn=causal_conv1d_fn, causal_conv1d_update=causal_conv1d_update)
    except ImportError as e:
        errors["causal_conv1d"] = f"{type(e).__name__}: {e}"
    return found, errors


def kernels_available() -> dict[str, bool]:
    """Which optional kernel packages import here."""
    _, errors = _import_kernels()
    return {"mamba_ssm": "mamba_ssm" not in errors, "causal_conv1d": "causal_conv1d" not in errors}


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning(message)


def resolve_backend(device_type: str, backend: str | None = None) -> tuple[str, str]:
    """(ssm backend, conv backend), each ``"cuda"`` or ``"ref"``, for tensors on ``device_type``."""
    name = backend or os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        src = "backend argument" if backend else ENV_VAR
        raise ValueError(f"Mamba backend ({src}) must be one of {BACKENDS}, got {name!r}")
    if name == "ref":
        return "ref", "ref"
    _, errors = _import_kernels()
    if name == "cuda":
        if device_type != "cuda":
            raise ValueError(f"Mamba backend 'cuda' needs tensors on a CUDA device, got {device_type!r}; "
                             f"use backend 'ref' or 'auto' ({ENV_VAR})")
        if errors:
            raise ValueError(f"Mamba backend 'cuda' forced but kernels do not import: {errors}; build mamba-ssm "
                             f"and causal-conv1d (docs/mamba.md) or use backend 'ref'/'auto' ({ENV_VAR})")
        return "cuda", "cuda"
    if device_type != "cuda":
        return "ref", "ref"
    for pkg, err in errors.items():
        warn_once(pkg, f"constant_state: {pkg} is not importable ({err}); Mamba layers on CUDA fall back to the "
                       f"slow pure-PyTorch reference for the ops it provides. Install it for speed "
                       f"(docs/mamba.md) or set {ENV_VAR}=ref to silence this warning.")
    return ("ref" if "mamba_ssm" in errors else "cuda"), ("ref" if "causal_conv1d" in errors else "cuda")


class MambaOps:
    """The Mamba ops of one backend, with one signature each whatever the backend.

    Layouts: conv input ``[B, C, T]``; Mamba-1 scan ``[B, D, T]`` (mamba-ssm's); Mamba-2 scan
    ``[B, T, H, P]``. States are updated in place or returned in fp32, never reallocated here.
    """

    def __init__(self, ssm: str, conv: str):
        self.ssm, self.conv = ssm, conv
        self._k = _import_kernels()[0] if "cuda" in (ssm, conv) else {}

    @property
    def name(self) -> str:
        return self.ssm if self.ssm == self.conv else f"ssm={self.ssm},conv={self.conv}"

    # -- causal conv ------------------------------------------------------------------------------
    def causal_conv1d(self, x, weight, bias, conv_state, activation="silu", fresh: bool = False):
        """``x [B, C, T]`` from ``conv_state [B, C, K]`` (updated in place) -> ``[B, C, T]``.

        ``fresh=True`` promises a zero state: the kernel's own zero padding then serves, and ``x``
        may be channel-first or channel-last (``x.stride(1) == 1``) as causal-conv1d allows."""
        if self.conv == "ref":
            return ref.causal_conv1d_ref(x, weight, bias, conv_state, activation)
        k, t = weight.shape[-1], x.shape[-1]
        if fresh:
            out = self._k["causal_conv1d_fn"](x, weight, bias, activation=activation)
            conv_state.copy_(F.pad(x[:, :, -k:], (max(0, k - t), 0)))
            return out
        # Prepend the state's last K - 1 inputs instead of passing initial_states, which
        # causal-conv1d accepts only in the channel-last layout.
        xin = torch.cat([conv_state[:, :, 1:].to(x.dtype), x], dim=2)  # [B, C, K - 1 + T]
        out = self._k["causal_conv1d_fn"](xin, weight, bias, activation=activation)
        conv_state.copy_(xin[:, :, -k:])
        # A fresh tensor: the view out[:, :, K-1:] starts K-1 elements into its storage, and the
        # scan kernels' 16-byte vector loads fault on it ("misaligned address").
        return out[:, :, k - 1:].contiguous()

    def causal_conv1d_update(self, x, conv_state, weight, bias, activation="silu"):
        """One token ``x [B, C]``; ``conv_state [B, C, K]`` updated in place."""
        if self.conv == "ref":
            return ref.causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
        return self._k["causal_conv1d_update"](x, conv_state, weight, bias, activation)

    # -- Mamba-1 ----------------------------------------------------------------------------------
    def selective_scan(self, u, delta, A, B, C, D, z, delta_bias, initial_state, fresh: bool):
        """Mamba-1 prefill from ``initial_state [B, D, N]`` -> (``y [B, D, T]``, fp32 last state).

        ``fresh=True`` promises the initial state is zero (host knowledge, e.g. a first prefill)."""
        if self.ssm == "ref":
            return ref.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, True,
                                          None if fresh else initial_state)
        y, last = self._k["selective_scan_fn"](u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                               return_last_state=True)
        if fresh:
            return y, last
        # selective_scan_fn has no initial state. The scan is linear in it:
        # h_t += exp(A * sum_{s<=t} dt_s) h0, so y_t += C_t . that (times silu(z_t)); one fused Triton
        # pass adds both (kernels/mamba/state_correction.py).
        return continue_from_state(y, last.float().contiguous(), delta, delta_bias, A, initial_state.float(), C, z)

    def selective_state_update(self, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True):
        if self.ssm == "ref":
            return ref.selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        return self._k["selective_state_update"](state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                                 dt_softplus=dt_softplus)

    # -- Mamba-2 ----------------------------------------------------------------------------------
    def ssd(self, x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, initial_states, fresh: bool = False):
        """Mamba-2 prefill from ``initial_states [B, H, P, N]`` -> (``y [B, T, H, P]``, fp32 final state)."""
        init = None if fresh else initial_states
        if self.ssm == "ref":
            return ref.ssd_ref(x, dt, A, B, C, chunk_size, D, None, dt_bias, True, dt_limit, init)
        y, final = self._k["mamba_chunk_scan_combined"](x, dt, A, B, C, chunk_size, D=D, z=None, dt_bias=dt_bias,
                                                        initial_states=init, dt_softplus=True,
                                                        dt_limit=tuple(dt_limit), return_final_states=True)
        return y, final

    def add_rmsnorm(self, x, residual, weight, eps, residual_in_fp32):
        """``residual += x`` (fp32 if asked; ``residual`` None: starts as ``x``), then RMSNorm of it
        in ``weight``'s dtype. Returns (normed, new residual)."""
        fused = self._k.get("layer_norm_fn") if self.ssm == "cuda" else None
        if fused is not None:
            return fused(x, weight, None, residual=residual, eps=eps, prenorm=True,
                         residual_in_fp32=residual_in_fp32, is_rms_norm=True)
        return ref.add_rmsnorm_ref(x, residual, weight, eps, residual_in_fp32)

    def gated_rmsnorm(self, x, z, weight, eps, group_size, norm_before_gate):
        if self.ssm == "ref":
            return ref.gated_rmsnorm_ref(x, z, weight, eps, group_size, norm_before_gate)
        return self._k["rmsnorm_fn"](x, weight, None, z=z, eps=eps, group_size=group_size,
                                     norm_before_gate=norm_before_gate)


@lru_cache(maxsize=None)
def _ops(ssm: str, conv: str) -> MambaOps:
    return MambaOps(ssm, conv)


def get_ops(device: torch.device | str, backend: str | None = None) -> MambaOps:
    """The ops for tensors on ``device``; ``backend`` (``ref``/``cuda``/``auto``) overrides the env var."""
    return _ops(*resolve_backend(torch.device(device).type, backend))
