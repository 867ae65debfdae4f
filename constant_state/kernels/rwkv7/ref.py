"""The RWKV-7 (x070) wkv recurrence in plain PyTorch, fp32: the documentation, CPU path and test oracle.

Layout ``[B, T, H, D]`` for ``r, w, k, v, a, b``; states ``[B, H, K, V]`` (key index first). ``w`` is
the *log* of the per-channel decay (the model feeds ``-exp(-0.5) * sigmoid(.)``, so ``w`` is in
``[-0.6065, 0]``). Per head and step, with ``S`` the ``[K, V]`` state::

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t = S_t^T r_t

(In the rwkv package's ``[V, K]`` layout this is ``S = S * w + S @ (a b^T) + v k^T``, ``o = S @ r``.)
"""

from __future__ import annotations

import torch

__all__ = ["rwkv7_ref", "rwkv7_chunk_ref", "timemix_core_ref", "DECAY_SCALE"]


def rwkv7_ref(r, w, k, v, a, b, state: torch.Tensor | None = None):
    """The obvious loop over time. Returns ``(o [B, T, H, V] in r's dtype, final_state [B, H, K, V] fp32)``;
    the input ``state`` is not modified. ``a = -kk`` and ``b = kk * a_gate`` in the model."""
    bsz, t, h, dk = r.shape
    dv = v.shape[-1]
    dtype = r.dtype
    r, w, k, v, a, b = (x.float() for x in (r, w, k, v, a, b))
    s = torch.zeros(bsz, h, dk, dv, dtype=torch.float32, device=r.device) if state is None else state.float().clone()
    o = torch.empty(bsz, t, h, dv, dtype=torch.float32, device=r.device)
    decay = w.exp()
    for i in range(t):
        sa = torch.einsum("bhk,bhkv->bhv", a[:, i], s)  # [B, H, V]
        s = s * decay[:, i, :, :, None] + b[:, i, :, :, None] * sa[:, :, None] + k[:, i, :, :, None] * v[:, i, :, None]
        o[:, i] = torch.einsum("bhk,bhkv->bhv", r[:, i], s)
    return o.to(dtype), s


def rwkv7_chunk_ref(r, w, k, v, a, b, state: torch.Tensor | None = None, chunk_size: int = 16):
    """The same recurrence, chunked (the algorithm of the Triton chunk kernel, fp32, any decay).

    Within a chunk starting from state ``S0``, with ``g_t`` the inclusive cumulative log decay,
    the vectors ``u_t = S_{t-1}^T a_t`` solve a unit lower-triangular system
    ``u = (I - L_ab)^{-1} (A~ S0 + L_ak V)``, after which outputs and the chunk's final state are
    matrix products. Decay ratios ``exp(g_t - g_s)`` are formed per element (no overflow for any w).
    """
    bsz, t, h, dk = r.shape
    dv = v.shape[-1]
    dtype = r.dtype
    r, w, k, v, a, b = (x.float() for x in (r, w, k, v, a, b))
    s = torch.zeros(bsz, h, dk, dv, dtype=torch.float32, device=r.device) if state is None else state.float().clone()
    out = []
    for c0 in range(0, t, chunk_size):
        sl = slice(c0, min(c0 + chunk_size, t))
        rc, wc, kc, vc, ac, bc = (x[:, sl].transpose(1, 2) for x in (r, w, k, v, a, b))  # [B, H, L, D]
        n = rc.shape[2]
        g = wc.cumsum(2)  # [B, H, L, K] inclusive
        g_ex = g - wc  # exclusive
        # ratio[t, s, :] = exp(g_t - g_s) (inclusive t) and exp(g_{t-1} - g_s) (exclusive t), s <= t only.
        tri_in = torch.ones(n, n, dtype=torch.bool, device=r.device).tril()
        tri_ex = tri_in.tril(-1)
        d_in = (g[:, :, :, None] - g[:, :, None, :]).masked_fill(~tri_in[:, :, None], float("-inf")).exp()
        d_ex = (g_ex[:, :, :, None] - g[:, :, None, :]).masked_fill(~tri_ex[:, :, None], float("-inf")).exp()
        l_ab = torch.einsum("bhtk,bhtsk,bhsk->bhts", ac, d_ex, bc)
        l_ak = torch.einsum("bhtk,bhtsk,bhsk->bhts", ac, d_ex, kc)
        l_rb = torch.einsum("bhtk,bhtsk,bhsk->bhts", rc, d_in, bc)
        l_rk = torch.einsum("bhtk,bhtsk,bhsk->bhts", rc, d_in, kc)
        rhs = (ac * g_ex.exp()) @ s + l_ak @ vc  # [B, H, L, V]
        eye = torch.eye(n, device=r.device)
        u = torch.linalg.solve_triangular(eye - l_ab, rhs, upper=False, unitriangular=True)
        out.append(((rc * g.exp()) @ s + l_rb @ u + l_rk @ vc).transpose(1, 2))
        last = g[:, :, -1:]  # [B, H, 1, K]
        to_end = (last - g).exp()  # [B, H, L, K]
        s = s * last.transpose(2, 3).exp() + (bc * to_end).transpose(2, 3) @ u + (kc * to_end).transpose(2, 3) @ vc
    o = torch.cat(out, 1)
    return o.to(dtype), s


DECAY_SCALE = 0.606531
"""exp(-0.5): the decay is exp(-DECAY_SCALE * sigmoid(.)), as in the rwkv package."""


def timemix_core_ref(r, k, v, w_lo, a_lo, v_lo, v_first, g, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, eps: float,
                     state: torch.Tensor, wkv=None) -> torch.Tensor:
    """The part of RWKV-7's time mix between the projections and the output projection.

    ``r, k, v, g`` and the LoRA outputs ``w_lo = tanh(xw @ w1) @ w2``, ``a_lo = (xa @ a1) @ a2``,
    ``v_lo = (xv @ v1) @ v2`` (None in layer 0, with ``v_first``) are ``[B, T, C]``; ``w0, a0, v0,
    k_k, k_a, ln_w, ln_b`` are ``[C]``, ``r_k`` is ``[H, N]``. Updates ``state [B, H, N, N]`` (fp32) in
    place and returns ``(GroupNorm(wkv) + bonus) * g`` ``[B, T, C]``. ``wkv`` computes the recurrence
    (default: :func:`rwkv7_ref`; it must return ``o`` and update ``state`` in place).
    """
    bsz, t, c = r.shape
    h, n = r_k.shape
    shape = (bsz, t, h, n)
    log_w = -DECAY_SCALE * torch.sigmoid((w0 + w_lo).float())
    a = torch.sigmoid(a0 + a_lo)
    kk = torch.nn.functional.normalize((k * k_k).view(shape), dim=-1, p=2.0)
    k = k * (1 + (a - 1) * k_a)
    if v_lo is not None:
        v = v + (v_first - v) * torch.sigmoid(v0 + v_lo)
    args = (r.view(shape), log_w.view(shape), k.view(shape), v.view(shape), -kk, kk * a.view(shape))
    if wkv is None:
        o, s = rwkv7_ref(*args, state)
        state.copy_(s)
    else:
        o = wkv(*args, state)
    o = torch.nn.functional.group_norm(o.reshape(bsz * t, c).to(r.dtype), h, ln_w, ln_b, eps).view(bsz, t, c)
    bonus = (r.view(shape) * k.view(shape) * r_k).sum(-1, keepdim=True) * v.view(shape)  # [B, T, H, N]
    return (o + bonus.view(bsz, t, c)) * g
