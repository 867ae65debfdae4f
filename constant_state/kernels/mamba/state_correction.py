"""Mamba-1 prefill from an existing state on top of mamba-ssm's zero-state scan.

mamba-ssm's ``selective_scan_fn`` starts every scan from a zero state. The recurrence is linear in
the state, so a scan from ``h0`` adds ``exp(A * cs_t) h0`` to the state at step ``t``
(``cs_t = sum_{s <= t} dt_s``) and ``C_t . exp(A * cs_t) h0`` to the output, before the gate
(:func:`initial_state_correction_ref`, chunked over time to bound its ``[B, D, L, N]`` temporary).

:func:`continue_from_state` fuses the whole continuation after the zero-state scan (softplus of
``dt``, its running sum over time, the output term, the gate ``silu(z)``, the add into ``y`` and
the final-state term) in one pass: a program owns ``BLOCK_D`` channels of one row and walks time
in tiles, carrying the running sum. :func:`continue_from_state_ref` is its reference.
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


def continue_from_state_ref(y, last, dt, dt_bias, A, h0, C, z):
    """``y [B, D, T]`` and fp32 ``last [B, D, N]`` of a zero-state scan -> those of a scan from ``h0``:
    ``y += corr * silu(z)`` (``corr`` of :func:`initial_state_correction_ref` on the running sum of
    ``softplus(dt + dt_bias)``) and ``last += exp(A * sum_t dt_t) * h0``. Returns new tensors."""
    d = dt.float() + (dt_bias.float()[:, None] if dt_bias is not None else 0.0)
    cs = torch.nn.functional.softplus(d).cumsum(-1)  # [B, D, T]
    corr = initial_state_correction_ref(cs, A, h0, C)
    if z is not None:
        corr = corr * torch.nn.functional.silu(z.float())
    y = (y.float() + corr).to(y.dtype)
    last = last.float() + torch.exp(cs[:, :, -1:] * A.float()) * h0.float()
    return y, last


if triton is not None:
    @triton.jit(do_not_specialize=["D", "T"])
    def _continue_kernel(y_ptr, last_ptr, dt_ptr, bias_ptr, a_ptr, h0_ptr, c_ptr, z_ptr, D, T,
                         sy_b, sy_d, sdt_b, sdt_d, sz_b, sz_d, sc_b, sc_n,
                         N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                         HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr):
        LOG2E: tl.constexpr = 1.4426950408889634
        pid = tl.program_id(0)
        nd = tl.cdiv(D, BLOCK_D)
        b = (pid // nd).to(tl.int64)
        offs_d = (pid % nd) * BLOCK_D + tl.arange(0, BLOCK_D)
        md = offs_d < D
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
        carry = tl.zeros([BLOCK_D], tl.float32)  # sum of dt over the steps done
        h_row = (b * D + offs_d) * N
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            m2 = md[:, None] & (offs_t < T)[None, :]
            x = tl.load(dt_ptr + b * sdt_b + offs_d[:, None] * sdt_d + offs_t[None, :], mask=m2,
                        other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += bias[:, None]
            # softplus (torch's: identity above 20), stable form; 0 on padding
            sp = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
            sp = tl.where(m2, tl.where(x > 20.0, x, sp), 0.0)
            cs = (carry[:, None] + tl.cumsum(sp, axis=1)) * LOG2E
            carry += tl.sum(sp, axis=1)
            acc = tl.zeros([BLOCK_D, BLOCK_T], tl.float32)
            for n in range(N):  # a runtime loop: unrolled, the hoisted loads of all N spill
                a_n = tl.load(a_ptr + offs_d * N + n, mask=md, other=0.0).to(tl.float32)
                h_n = tl.load(h0_ptr + h_row + n, mask=md, other=0.0).to(tl.float32)
                c_n = tl.load(c_ptr + b * sc_b + n * sc_n + offs_t, mask=offs_t < T, other=0.0).to(tl.float32)
                acc += tl.exp2(cs * a_n[:, None]) * (h_n[:, None] * c_n[None, :])
            if HAS_Z:
                zz = tl.load(z_ptr + b * sz_b + offs_d[:, None] * sz_d + offs_t[None, :], mask=m2,
                             other=0.0).to(tl.float32)
                acc = acc * (zz / (1.0 + tl.exp(-zz)))
            yp = y_ptr + b * sy_b + offs_d[:, None] * sy_d + offs_t[None, :]
            yv = tl.load(yp, mask=m2, other=0.0).to(tl.float32)
            tl.store(yp, (yv + acc).to(y_ptr.dtype.element_ty), mask=m2)
        for n in range(N):
            a_n = tl.load(a_ptr + offs_d * N + n, mask=md, other=0.0).to(tl.float32)
            h_n = tl.load(h0_ptr + h_row + n, mask=md, other=0.0).to(tl.float32)
            lp = last_ptr + h_row + n
            lv = tl.load(lp, mask=md, other=0.0)
            tl.store(lp, lv + tl.exp2(carry * LOG2E * a_n) * h_n, mask=md)


def continue_from_state(y, last, dt, dt_bias, A, h0, C, z):
    """Triton twin of :func:`continue_from_state_ref`, in place on ``y`` (any float dtype, unit stride
    along time) and ``last`` (fp32 contiguous); returns them. CPU tensors take the reference."""
    if triton is None or (not y.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"):
        y2, last2 = continue_from_state_ref(y, last, dt, dt_bias, A, h0, C, z)
        y.copy_(y2)
        last.copy_(last2)
        return y, last
    b, d, t = y.shape
    n = A.shape[1]
    if A.shape != (d, n) or h0.shape != (b, d, n) or C.shape != (b, n, t) or dt.shape != (b, d, t) \
            or last.shape != (b, d, n) or (z is not None and z.shape != (b, d, t)):
        raise ValueError("continue_from_state: expected y, dt, z [B, D, T], A [D, N], h0, last [B, D, N], C [B, N, T]; "
                         f"got y {tuple(y.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, h0 {tuple(h0.shape)}, "
                         f"last {tuple(last.shape)}, C {tuple(C.shape)}")
    if last.dtype != torch.float32 or not last.is_contiguous():
        raise ValueError("continue_from_state: last must be contiguous fp32")
    unit = lambda x: x if x.stride(-1) == 1 else x.contiguous()  # noqa: E731
    y_k = unit(y)
    dt, C = unit(dt), unit(C)
    z = unit(z) if z is not None else None
    A, h0 = A.float().contiguous(), h0.float().contiguous()
    block_d, block_t = 32, 64
    _continue_kernel[(b * triton.cdiv(d, block_d),)](
        y_k, last, dt, dt_bias if dt_bias is not None else A, A, h0, C, z if z is not None else dt, d, t,
        y_k.stride(0), y_k.stride(1), dt.stride(0), dt.stride(1),
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0, C.stride(0), C.stride(1),
        N=n, BLOCK_D=block_d, BLOCK_T=block_t, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, num_warps=4)
    if y_k is not y:
        y.copy_(y_k)
    return y, last
