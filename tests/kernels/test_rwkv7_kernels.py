"""RWKV-7 Triton kernels vs the fp32 reference on tiny shapes: output and final state.

Runs on a GPU, or on the CPU under Triton's interpreter when TRITON_INTERPRET=1 was set before
triton was imported (tests/test_rwkv7.py runs this file in such a subprocess). In a plain CPU
pytest process it skips: the interpreter cannot be switched on after import.
"""

import pytest
import torch
from helpers import KERNEL_DEVICE, needs_interpreter_or_cuda

pytestmark = needs_interpreter_or_cuda
DEVICE = KERNEL_DEVICE


def inputs(b, t, h, dk, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    r, k, v = rnd(b, t, h, dk), rnd(b, t, h, dk) * 0.5, rnd(b, t, h, dv)
    w = -0.606531 * torch.sigmoid(rnd(b, t, h, dk) * 2)  # the model's log-decay range
    kk = torch.nn.functional.normalize(rnd(b, t, h, dk), dim=-1)
    gate = torch.rand((b, t, h, dk), generator=g)
    xs = [x.to(DEVICE, dtype) for x in (r, w, k, v, -kk, kk * gate)]
    s0 = rnd(b, h, dk, dv).to(DEVICE)
    return xs, s0


def assert_close(name, ref, out, tol):
    err = (ref.float() - out.float()).abs().max().item()
    assert err <= tol, f"{name}: max abs err {err:.3e} > {tol:.1e}"


CASES = [pytest.param(t, id=f"T{t}") for t in (1, 7, 33)]


@pytest.mark.parametrize("t", CASES)
@pytest.mark.parametrize("kernel", ["fused_recurrent", "chunk", "chunk32", "chunk_bv32", "chunk_rows"])
def test_kernel_matches_reference(kernel, t):
    from functools import partial

    from constant_state.kernels.rwkv7.chunk import chunk_rwkv7
    from constant_state.kernels.rwkv7.fused_recurrent import fused_recurrent_rwkv7
    from constant_state.kernels.rwkv7.ref import rwkv7_ref

    fn = {"chunk": chunk_rwkv7, "fused_recurrent": fused_recurrent_rwkv7,
          "chunk32": partial(chunk_rwkv7, chunk_size=32, config=(32, 4, 1)),
          "chunk_bv32": partial(chunk_rwkv7, config=(32, 4, 2)),
          "chunk_rows": partial(chunk_rwkv7, inverse="rows")}[kernel]
    xs, s0 = inputs(2, t, 2, 32, 32)
    o_ref, s_ref = rwkv7_ref(*xs, s0)
    o, s = fn(*xs, s0)
    assert_close(f"{kernel} o", o_ref, o, 5e-5)
    assert_close(f"{kernel} state", s_ref, s, 5e-5)
    # In place: the state object is updated, its address kept.
    s_in = s0.clone()
    ptr = s_in.data_ptr()
    o2, s2 = fn(*xs, s_in, inplace=True)
    assert s2 is s_in and s_in.data_ptr() == ptr
    assert_close(f"{kernel} inplace state", s_ref, s_in, 5e-5)
    assert_close(f"{kernel} inplace o", o, o2, 0.0)


def test_kernels_odd_head_size_and_no_state():
    from functools import partial

    from constant_state.kernels.rwkv7.chunk import chunk_rwkv7
    from constant_state.kernels.rwkv7.fused_recurrent import fused_recurrent_rwkv7
    from constant_state.kernels.rwkv7.ref import rwkv7_ref

    xs, _ = inputs(1, 19, 3, 24, 40)
    o_ref, s_ref = rwkv7_ref(*xs)
    for name, fn in (("chunk", chunk_rwkv7), ("chunk_bv64", partial(chunk_rwkv7, config=(64, 4, 2))),
                     ("fused_recurrent", fused_recurrent_rwkv7)):
        o, s = fn(*xs)
        assert_close(name, o_ref, o, 5e-5)
        assert_close(name + " state", s_ref, s, 5e-5)


@pytest.mark.parametrize("kernel", ["fused_recurrent", "chunk"])
def test_kernel_validates_inputs(kernel):
    from constant_state.kernels.rwkv7.chunk import chunk_rwkv7
    from constant_state.kernels.rwkv7.fused_recurrent import fused_recurrent_rwkv7

    fn = {"chunk": chunk_rwkv7, "fused_recurrent": fused_recurrent_rwkv7}[kernel]
    xs, s0 = inputs(1, 3, 2, 16, 16)
    with pytest.raises(ValueError, match="state shape expected"):
        fn(*xs, s0[:, :1])
    with pytest.raises(ValueError, match="shape expected"):
        fn(xs[0], xs[1][:, :2], *xs[2:])
    with pytest.raises(ValueError, match="state dtype expected"):
        fn(*xs, s0.double())


@pytest.mark.parametrize("t", CASES)
@pytest.mark.parametrize("first_layer", [True, False], ids=["layer0", "layer1"])
def test_fused_timemix_matches_reference(t, first_layer):
    from constant_state.kernels.rwkv7.chunk import chunk_rwkv7
    from constant_state.kernels.rwkv7.fused_layer import fused_timemix_rwkv7, timemix_chunked_rwkv7
    from constant_state.kernels.rwkv7.ref import timemix_core_ref

    g = torch.Generator().manual_seed(t)
    b, h, n = 2, 2, 32
    c = h * n
    rnd = lambda *s, scale=1.0: (torch.randn(s, generator=g) * scale).to(DEVICE)  # noqa: E731
    r, k, v, w_lo, a_lo, v_lo, v_first, gate = (rnd(b, t, c) for _ in range(8))
    w0, a0, v0, k_k, k_a, ln_w, ln_b = (rnd(c) for _ in range(7))
    r_k = rnd(h, n, scale=0.1)
    if first_layer:
        v_lo = v_first = v0 = None
    args = (r, k, v, w_lo, a_lo, v_lo, v_first, gate, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, 64e-5)
    s0 = rnd(b, h, n, n)
    s_ref, s_out = s0.clone(), s0.clone()
    y_ref = timemix_core_ref(*args, s_ref)
    y = fused_timemix_rwkv7(*args, s_out)
    assert_close("fused timemix y", y_ref, y, 2e-4)
    assert_close("fused timemix state", s_ref, s_out, 5e-5)
    # The long-input form: fused prologue, chunked kernel, fused epilogue.
    s_chunk = s0.clone()
    y2 = timemix_chunked_rwkv7(*args, s_chunk, wkv=lambda *a: chunk_rwkv7(*a, inplace=True)[0])
    assert_close("chunked timemix y", y_ref, y2, 2e-4)
    assert_close("chunked timemix state", s_ref, s_chunk, 5e-5)


@torch.no_grad()
def test_model_triton_backend_matches_torch_backend(monkeypatch):
    import constant_state as cs
    from constant_state.kernels import rwkv7 as k7
    from constant_state.models.rwkv7 import RWKV7Config

    monkeypatch.setattr(k7, "CHUNK_MIN_T", 16)  # a short prefill takes the chunked path (fast under the interpreter)
    cfg = RWKV7Config(vocab_size=64, hidden_size=64, num_layers=2, head_size=32, decay_lora=32, a_lora=32,
                      v_lora=32, gate_lora=32, dtype="float32")
    model = cs.build_model(cfg, dtype="float32", device=DEVICE)
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    logits = {}
    for backend in ("torch", "triton"):
        model.set_kernel(backend)
        state = model.init_state(1)
        parts = [model(ids[:, :17], state)[0]]  # chunked kernel
        parts += [model(ids[:, i:i + 1], state)[0] for i in range(17, 20)]  # fused time-mix kernel
        logits[backend] = torch.cat(parts, 1)
    assert_close("model logits triton vs torch", logits["torch"], logits["triton"], 1e-4)


def test_chunk_kernel_correlated_keys():
    """Nearly parallel keys with slow decay: the case where a power-series triangular inverse fails."""
    from constant_state.kernels.rwkv7.chunk import chunk_rwkv7
    from constant_state.kernels.rwkv7.ref import rwkv7_ref

    g = torch.Generator().manual_seed(0)
    b, t, h, d = 1, 40, 1, 32
    r, k, v = (torch.randn(b, t, h, d, generator=g) for _ in range(3))
    w = torch.full((b, t, h, d), -1e-3)
    kk = torch.randn(d, generator=g) + 0.01 * torch.randn(b, t, h, d, generator=g)
    kk = torch.nn.functional.normalize(kk, dim=-1)
    xs = [x.to(DEVICE) for x in (r, w, k, v, -kk, 0.9 * kk)]
    o_ref, s_ref = rwkv7_ref(*xs)
    scale = o_ref.abs().max().item()
    for bt in (16, 32):
        for inverse in ("blocked", "rows"):
            o, s = chunk_rwkv7(*xs, chunk_size=bt, inverse=inverse)
            assert_close(f"correlated o BT={bt} {inverse}", o_ref / scale, o / scale, 2e-6)
            assert_close(f"correlated state BT={bt} {inverse}", s_ref / scale, s / scale, 2e-6)


def inverses_ref(w, a, b, bt):
    """(I - L_ab)^{-1} per chunk in fp64 (zero-padded tail chunk), ``[B * H, NT, BT, BT]``."""
    bsz, t, h, d = w.shape
    nt = -(-t // bt)
    pad = lambda x: torch.nn.functional.pad(x.double().cpu(), (0, 0, 0, 0, 0, nt * bt - t))  # noqa: E731
    w, a, b = (pad(x).view(bsz, nt, bt, h, d).permute(0, 3, 1, 2, 4) for x in (w, a, b))  # [B, H, NT, BT, D]
    g = w.cumsum(-2)
    l_ab = ((a * (g - w).exp()) @ (b * (-g).exp()).transpose(-1, -2)).tril(-1)
    eye = torch.eye(bt, dtype=torch.float64)
    return torch.linalg.inv(eye - l_ab).reshape(bsz * h, nt, bt, bt)


@pytest.mark.parametrize("bt", [16, 32])
def test_chunk_inverses_blocked_vs_rows(bt):
    """The blocked inverse kernel vs fp64 and vs the row-wise one: T not a multiple of the chunk, one or
    several chunks per program with a ragged last program."""
    from constant_state.kernels.rwkv7.chunk import chunk_inverses

    for t, nc in ((7, None), (2 * bt + 1, 1), (5 * bt + 3, 4), (5 * bt, 8)):
        xs, _ = inputs(2, t, 3, 24, 24, seed=t)
        w, a, b = xs[1], xs[4], xs[5]
        ref = inverses_ref(w, a, b, bt)
        rows = chunk_inverses(w, a, b, bt, inverse="rows", precision="ieee")
        blocked = chunk_inverses(w, a, b, bt, inverse="blocked", precision="ieee", chunks_per_program=nc)
        assert blocked.shape == ref.shape == rows.shape
        assert_close(f"blocked BT={bt} T={t} NC={nc}", ref, blocked, 1e-6)
        assert_close(f"rows BT={bt} T={t}", ref, rows, 1e-6)


def test_chunk_inverse_validation():
    from constant_state.kernels.rwkv7.chunk import chunk_rwkv7

    xs, _ = inputs(1, 3, 1, 16, 16)
    with pytest.raises(ValueError, match="inverse"):
        chunk_rwkv7(*xs, inverse="power")
    with pytest.raises(ValueError, match="config"):
        chunk_rwkv7(*xs, config=(16, 4))
