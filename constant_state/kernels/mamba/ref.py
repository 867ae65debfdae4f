"""Pure-PyTorch references of the Mamba ops, computed in fp32: the CPU path and the test oracle.

Signatures follow mamba-ssm's kernels (``causal_conv1d_fn``, ``selective_scan_fn``,
``mamba_chunk_scan_combined``, ``selective_state_update``), plus an initial state everywhere: a
prefill may start from an existing state. Prefill is a chunked scan (a Python loop over chunks,
never over tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _act(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation in ("silu", "swish"):
        return F.silu(x)
    if activation is None:
        return x
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor,
                      activation: str | None = "silu") -> torch.Tensor:
    """Depthwise causal conv of ``x [B, C, T]`` continuing from ``conv_state [B, C, K]``.

    ``conv_state`` holds the last ``K`` inputs (zeros before the first token) and is updated in
    place; ``weight`` is ``[C, K]``. Returns ``[B, C, T]`` in ``x.dtype``. T == 1 is the decode update.
    """
    k = weight.shape[-1]
    if conv_state.shape[-1] != k:
        raise ValueError(f"conv_state width expected {k} (the kernel width), got {conv_state.shape[-1]}")
    xin = torch.cat([conv_state[:, :, 1:].to(x.dtype), x], dim=2)  # [B, C, K - 1 + T]
    out = F.conv1d(xin.float(), weight.float()[:, None], None if bias is None else bias.float(),
                   groups=weight.shape[0])  # [B, C, T]
    conv_state.copy_(xin[:, :, -k:])
    return _act(out, activation).to(x.dtype)


def causal_conv1d_update_ref(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None, activation: str | None = "silu") -> torch.Tensor:
    """One token ``x [B, C]`` through the causal conv; ``conv_state [B, C, K]`` updated in place."""
    return causal_conv1d_ref(x[:, :, None], weight, bias, conv_state, activation)[:, :, 0]


def _linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All prefixes of ``h_t = a_t * h_{t-1} + b_t`` from ``h_{-1} = 0`` along dim 1 (Hillis-Steele)."""
    t, k = a.shape[1], 1
    while k < t:
        b = torch.cat([b[:, :k], a[:, k:] * b[:, :-k] + b[:, k:]], dim=1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    return b


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                       delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                       initial_state: torch.Tensor | None = None, chunk_size: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan: ``u, delta, z [B, D, T]``, ``A [D, N]``, ``B, C [B, N, T]``.

    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = C_t h_t + D u_t``, times
    ``silu(z_t)``. Starts from ``initial_state [B, D, N]`` (zeros if None). Returns ``y [B, D, T]``
    in ``u.dtype`` and the last state ``[B, D, N]`` in fp32.
    """
    bsz, d, t = u.shape
    n = A.shape[-1]
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A = A.float()
    h = (torch.zeros((bsz, d, n), dtype=torch.float32, device=u.device) if initial_state is None
         else initial_state.float())
    ys = []
    for s in range(0, t, chunk_size):
        e = min(s + chunk_size, t)
        dtc = dt[:, :, s:e].transpose(1, 2)  # [B, L, D]
        a = torch.exp(dtc[..., None] * A)  # [B, L, D, N]
        b = (dtc * u[:, :, s:e].float().transpose(1, 2))[..., None] * B[:, None, :, s:e].float().permute(0, 3, 1, 2)
        b[:, 0] += a[:, 0] * h
        hs = _linear_scan(a, b)  # [B, L, D, N]
        ys.append(torch.einsum("bldn,bnl->bdl", hs, C[:, :, s:e].float()))
        h = hs[:, -1]
    y = torch.cat(ys, dim=2)  # [B, D, T]
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), h


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., l, s] = a[..., s+1] + ... + a[..., l]`` for ``s <= l``, ``-inf`` above the diagonal.

    Summed from masked copies rather than as a difference of cumulative sums, which loses
    precision once the cumulative log-decay is large."""
    L = a.shape[-1]
    x = a[..., :, None].expand(*a.shape, L)  # x[..., k, s] = a[k]
    strict = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    out = x.masked_fill(~strict, 0).cumsum(dim=-2)
    keep = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return out.masked_fill(~keep, float("-inf"))


def ssd_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
            D: torch.Tensor | None = None, z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
            dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, float("inf")),
            initial_states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 chunked scan (SSD): ``x [B, T, H, P]``, ``dt [B, T, H]``, ``A [H]``,
    ``B, C [B, T, G, N]`` (head ``h`` reads group ``h // (H // G)``), ``D [H]``, ``z [B, T, H, P]``.

    Starts from ``initial_states [B, H, P, N]``; returns ``y [B, T, H, P]`` in ``x.dtype`` and the
    final state ``[B, H, P, N]`` in fp32. Any chunk size gives the same result up to rounding.
    """
    bsz, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of groups ({g})")
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    xf = x.float()
    Bh = B.float().repeat_interleave(h // g, dim=2)  # [B, T, H, N]
    Ch = C.float().repeat_interleave(h // g, dim=2)  # [B, T, H, N]
    L = chunk_size
    pad = (-t) % L
    nc = (t + pad) // L

    def chunks(v):  # [B, T, ...] -> [B, nc, L, ...], zero padded (dt = 0: no decay, no input)
        v = F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad))
        return v.reshape(bsz, nc, L, *v.shape[2:])

    xdt = chunks(xf * dt[..., None])  # [B, c, L, H, P]
    a = chunks(dt * A.float())  # [B, c, L, H] log-decay per token
    Bc, Cc = chunks(Bh), chunks(Ch)  # [B, c, L, H, N]
    a = a.permute(0, 3, 1, 2)  # [B, H, c, L]
    acs = a.cumsum(-1)  # [B, H, c, L]
    # Inside each chunk: attention-like with the causal decay mask.
    decay = torch.exp(_segsum(a))  # [B, H, c, L(l), L(s)]
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
    # Each chunk's own contribution to the state at its end.
    to_end = torch.exp(acs[..., -1:] - acs)  # [B, H, c, L]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, to_end, xdt)  # [B, c, H, P, N]
    # Pass states across chunks, starting from the initial state.
    h0 = (torch.zeros_like(states[:, :1]) if initial_states is None else initial_states.float()[:, None])
    states = torch.cat([h0, states], dim=1)  # [B, c + 1, H, P, N]
    chunk_decay = torch.exp(_segsum(F.pad(acs[..., -1], (1, 0))))  # [B, H, c + 1, c + 1]
    starts = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)  # state entering chunk z
    final = starts[:, -1]
    # State entering each chunk, read out with the decay inside the chunk.
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, starts[:, :-1], torch.exp(acs))
    y = y.reshape(bsz, nc * L, h, p)[:, :t]
    if D is not None:
        y = y + D.float()[:, None] * xf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype), final


def selective_state_update_ref(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                               B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                               z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                               dt_softplus: bool = False) -> torch.Tensor:
    """One decode step of either Mamba, ``state`` updated in place; returns ``y`` like ``x``.

    Mamba-1: ``state [B, D, N]``, ``x, dt, z [B, D]``, ``A [D, N]``, ``B, C [B, N]``, ``D, dt_bias [D]``.
    Mamba-2: ``state [B, H, P, N]``, ``x, dt, z [B, H, P]``, ``A [H, P, N]``, ``B, C [B, G, N]``,
    ``D, dt_bias [H, P]`` (mamba-ssm's layout, per-head values broadcast over P).
    """
    if state.dim() == 3:
        y = selective_state_update_ref(state[:, :, None], x[:, :, None], dt[:, :, None], A[:, None], B[:, None],
                                       C[:, None], None if D is None else D[:, None],
                                       None if z is None else z[:, :, None],
                                       None if dt_bias is None else dt_bias[:, None], dt_softplus)
        return y[:, :, 0]
    h, g = state.shape[1], B.shape[1]
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = B.float().repeat_interleave(h // g, dim=1)[:, :, None]  # [B, H, 1, N]
    Ch = C.float().repeat_interleave(h // g, dim=1)[:, :, None]  # [B, H, 1, N]
    new = state.float() * torch.exp(dt[..., None] * A.float()) + (dt * x.float())[..., None] * Bh
    state.copy_(new)
    y = (new * Ch).sum(-1)  # [B, H, P]
    if D is not None:
        y = y + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def gated_rmsnorm_ref(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      group_size: int, norm_before_gate: bool = False) -> torch.Tensor:
    """RMSNorm over groups of ``group_size`` channels, gated by ``silu(z)`` before or after it."""
    xf = x.float()
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.float())
    shp = xf.shape
    xg = xf.reshape(*shp[:-1], shp[-1] // group_size, group_size)
    xf = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).reshape(shp)
    if z is not None and norm_before_gate:
        xf = xf * F.silu(z.float())
    return (weight.float() * xf).to(x.dtype)


def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                    residual_in_fp32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm residual step: ``residual = x + residual`` (fp32 if ``residual_in_fp32``), then
    ``weight * rmsnorm(residual)`` in ``weight.dtype``. Returns (normed, residual)."""
    res = x.float() if residual_in_fp32 else x
    if residual is not None:
        res = res + residual
    dtype = weight.dtype
    r = res.to(dtype).float()
    normed = weight * (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return normed, res
