"""Mamba-1 prefill from an existing state on top of mamba-ssm's zero-state scan.

mamba-ssm's ``selective_scan_fn`` starts every scan from a zero state. The recurrence is linear in
the state, so a scan from ``h0`` adds ``exp(A * cs_t) h0`` to the state at step ``t``
(``cs_t = sum_{s <= t} dt_s``) and ``C_t . exp(A * cs_t) h0`` to the output, before the gate.
:func:`initial_state_correction` computes that output term for every (row, channel, step) in one
Triton kernel: each program owns a ``[BLOCK_D, BLOCK_T]`` tile and sums over the ``N`` state
dims in registers (``N`` exponentials per output). :func:`initial_state_correction_ref` is the
PyTorch reference (chunked over time to bound its ``[B, D, L, N]`` temporary); it is also the path
without Triton.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU path needs no Triton
    triton = None


def initial_state_correction_ref(cs: torch.Tensor, A: torch.Tensor, h0: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``corr[b, d, t] = sum_n exp(A[d, n] * cs[b, d, t]) * h0[b, d, n] * C[b, n, t]`` in fp32.

    cs: ``[B, D, T]`` cumulative softplus(dt); A: ``[D, N]``; h0: ``[B, D, N]``; C: ``[B, N, T]``."""
    cs, A, h0, C = cs.float(), A.float(), h0.float(), C.float()
    t = cs.shape[-1]
    step = max(1, (1 << 26) // max(1, h0.numel()))
    corr = torch.empty_like(cs)
    for s in range(0, t, step):
        decay = torch.exp(cs[:, :, s:s + step, None] * A[:, None])  # [B, D, L, N]
        corr[:, :, s:s + step] = torch.einsum("bdln,bdn,bnl->bdl", decay, h0, C[:, :, s:s + step])
    return corr


if triton is not None:
    @triton.jit(do_not_specialize=["D", "T"])
    def _correction_kernel(cs_ptr, a_ptr, h0_ptr, c_ptr, out_ptr, D, T, N: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
        pid_bd = tl.program_id(0)
        pid_t = tl.program_id(1)
        nd = tl.cdiv(D, BLOCK_D)
        b = pid_bd // nd
        offs_d = (pid_bd % nd) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        md = offs_d < D
        mt = offs_t < T
        row = (b.to(tl.int64) * D + offs_d) * T  # [BLOCK_D]
        m2 = md[:, None] & mt[None, :]
        cs = tl.load(cs_ptr + row[:, None] + offs_t[None, :], mask=m2, other=0.0) * 1.4426950408889634
        acc = tl.zeros([BLOCK_D, BLOCK_T], tl.float32)
        h_row = (b.to(tl.int64) * D + offs_d) * N
        c_row = b.to(tl.int64) * N * T
        for n in range(N):  # a runtime loop: unrolled, the hoisted loads of all N spill
            a_n = tl.load(a_ptr + offs_d * N + n, mask=md, other=0.0)
            h_n = tl.load(h0_ptr + h_row + n, mask=md, other=0.0)
            c_n = tl.load(c_ptr + c_row + n * T + offs_t, mask=mt, other=0.0)
            acc += tl.exp2(cs * a_n[:, None]) * (h_n[:, None] * c_n[None, :])
        tl.store(out_ptr + row[:, None] + offs_t[None, :], acc, mask=m2)


def initial_state_correction(cs: torch.Tensor, A: torch.Tensor, h0: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`initial_state_correction_ref` (same arguments, fp32 ``[B, D, T]``)."""
    if triton is None or (not cs.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"):
        return initial_state_correction_ref(cs, A, h0, C)  # CPU tensors: the reference
    b, d, t = cs.shape
    n = A.shape[1]
    if A.shape != (d, n) or h0.shape != (b, d, n) or C.shape != (b, n, t):
        raise ValueError(f"initial_state_correction: expected A [D, N], h0 [B, D, N], C [B, N, T] for cs {tuple(cs.shape)}, "
                         f"got {tuple(A.shape)}, {tuple(h0.shape)}, {tuple(C.shape)}")
    cs, A, h0, C = (x.float().contiguous() for x in (cs, A, h0, C))
    out = torch.empty_like(cs)
    block_d, block_t = 32, 64
    grid = (b * triton.cdiv(d, block_d), triton.cdiv(t, block_t))
    _correction_kernel[grid](cs, A, h0, C, out, d, t, N=n, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=4)
    return out
