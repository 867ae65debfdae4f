"""Paged-attention Triton kernels (decode, prefill, quantize-and-write) vs their PyTorch references.

Runs on a GPU, or on the CPU under Triton's interpreter when TRITON_INTERPRET=1 was set before
triton was imported (tests/test_kv_formats.py runs this file in such a subprocess). In a plain CPU
pytest process it skips: the interpreter cannot be switched on after import.
"""

import pytest
import torch
from helpers import INTERPRET, KERNEL_DEVICE, needs_interpreter_or_cuda

from constant_state.cache.formats import get_format
from constant_state.kernels.paged_attention.ref import (QuantKV, dequantize_ref, paged_attention_ref,
                                                        quant_paged_attention_ref, quant_write_ref)

pytestmark = needs_interpreter_or_cuda
DEVICE = KERNEL_DEVICE
FORMATS = ["bf16", "fp8", "int8", "int4", "int4-g32"]


def make_cache(fmt: str, num_blocks: int, bs: int, hkv: int, d: int):
    st = get_format(fmt).make_storage(num_blocks, bs, hkv, d, DEVICE)
    return st


def fill(st, lens, block_tables, hkv, d, seed=0):
    """Write random K/V for every row's first ``lens[b]`` tokens with the reference writer."""
    g = torch.Generator().manual_seed(seed)
    bs = st.block_size
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        slots = (block_tables[b, pos // bs].long() * bs + pos % bs)[None].to(DEVICE)
        k = torch.randn(1, n, hkv, d, generator=g).to(DEVICE)
        v = torch.randn(1, n, hkv, d, generator=g).to(DEVICE)
        if isinstance(getattr(st, "cache", None), QuantKV):
            quant_write_ref(st.cache, k, v, slots)
        else:
            st.k.view(-1, hkv, d)[slots[0]] = k[0].to(st.k.dtype)
            st.v.view(-1, hkv, d)[slots[0]] = v[0].to(st.v.dtype)


def cache_arg(st):
    return st.cache if hasattr(st, "cache") else (st.k, st.v)


def reference(q, st, bt, lens, scale, window):
    if hasattr(st, "cache"):
        return quant_paged_attention_ref(q, st.cache, bt, lens, scale, window)
    return paged_attention_ref(q, st.k, st.v, bt, lens, scale, window)


def assert_close(name, ref, out, tol):
    err = (ref.float() - out.float()).abs().max().item()
    assert err <= tol, f"{name}: max abs err {err:.3e} > {tol:.1e}"


CASES = [
    # (T, lens, gqa, d, block_size, window, num_splits)
    pytest.param(1, [150, 37], 4, 32, 16, None, None, id="decode-gqa4"),
    pytest.param(1, [150, 37], 4, 32, 16, None, 3, id="decode-split3"),
    pytest.param(1, [61, 5], 1, 32, 8, None, 2, id="decode-mha-split2"),
    pytest.param(1, [150, 99], 8, 64, 16, 40, None, id="decode-gqa8-window"),
    pytest.param(7, [45, 7], 4, 32, 16, None, None, id="prefill-T7"),
    pytest.param(5, [33, 19], 2, 32, 4, 6, None, id="prefill-window"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("t, lens, gqa, d, bs, window, splits", CASES)
def test_attention_matches_reference(fmt, t, lens, gqa, d, bs, window, splits):
    from constant_state.kernels.paged_attention.decode import paged_attention

    hkv, b = 2, len(lens)
    m = -(-max(lens) // bs) + 1
    n = b * m + 3
    g = torch.Generator().manual_seed(1)
    bt = torch.randperm(n, generator=g)[:b * m].view(b, m).int()  # random, non-contiguous
    st = make_cache(fmt, n, bs, hkv, d)
    fill(st, lens, bt, hkv, d)
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    q = torch.randn(b, t, hkv * gqa, d, generator=g).to(DEVICE, dtype)
    bt, seq = bt.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = paged_attention(q, cache_arg(st), bt, seq, d ** -0.5, window, num_splits=splits)
    ref = reference(q, st, bt, seq, d ** -0.5, window)
    assert_close(f"{fmt} attention", ref, out, 2e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "bf16"])
@pytest.mark.parametrize("d", [32, 64])
def test_write_matches_reference(fmt, d):
    from constant_state.kernels.paged_attention.write import quant_write

    hkv, bs, n = 3, 4, 9
    a, b = make_cache(fmt, n, bs, hkv, d), make_cache(fmt, n, bs, hkv, d)
    g = torch.Generator().manual_seed(2)
    k = (torch.randn(2, 5, hkv, d, generator=g) * 3).to(DEVICE)
    v = torch.randn(2, 5, hkv, d, generator=g).to(DEVICE)
    k[0, 0, 0] = 0.0  # an all-zero head vector takes the minimum scale
    slots = torch.randperm(n * bs, generator=g)[:10].view(2, 5)
    slots[1, 4] = -1  # padding: skipped
    keep = slots >= 0
    quant_write_ref(a.cache, k[keep][None], v[keep][None], slots[keep][None].to(DEVICE))
    quant_write(b.cache, k, v, slots.to(DEVICE))
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                           y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y), fmt
    # Quantization error of the round trip, per format.
    kd, _ = dequantize_ref(b.cache)
    err = (kd.reshape(-1, hkv, d)[slots[keep].to(DEVICE)] - k[keep]).abs().max().item()
    assert err <= {"fp8": 0.6, "int8": 0.1, "int4": 1.2, "int4-g32": 1.2}[fmt]


@pytest.mark.parametrize("lens_steps", [[5, 1, 13, 1, 2]], ids=["mixed"])
@pytest.mark.parametrize("gqa, d, group, r, bs", [(4, 64, 32, 16, 8), (1, 32, 32, 8, 4), (8, 64, 64, 16, 16)])
def test_kivi_write_and_attention_match_reference(lens_steps, gqa, d, group, r, bs):
    """KIVI 2-bit through a sequence of writes of different lengths per row (prefill, steps, chunks
    crossing several flushes): blocks, scales and residual windows bit-equal to the reference;
    decode and prefill attention equal to the reference."""
    from constant_state.cache.quant import kivi_name

    fmt = get_format(kivi_name(group, r))
    hkv, b, m = 2, 2, 12
    n_blocks = b * m + 5
    g = torch.Generator().manual_seed(3)
    bt = torch.randperm(n_blocks, generator=g)[:b * m].view(b, m).int().to(DEVICE)
    ref_st, ker_st = fmt.make_storage(n_blocks, bs, hkv, d, DEVICE), fmt.make_storage(n_blocks, bs, hkv, d, DEVICE)
    ref_st.backend, ker_st.backend = "ref", "triton"
    ref_rows, ker_rows = fmt.row_tensors(b, hkv, d, DEVICE), fmt.row_tensors(b, hkv, d, DEVICE)
    n = torch.zeros(b, dtype=torch.int32, device=DEVICE)
    for t in lens_steps:  # every row writes t tokens per call; the rows' lengths differ from the start
        if int(n.sum()) == 0:
            n[1] = 3  # row 1 starts 3 tokens ahead: flush boundaries differ between rows
            ker_rows["res_k"][1, :3] = ref_rows["res_k"][1, :3] = torch.randn(3, hkv, d, generator=g).half()
            ker_rows["res_v"][1, :3] = ref_rows["res_v"][1, :3] = torch.randn(3, hkv, d, generator=g).half()
        k = torch.randn(b, t, hkv, d, generator=g).to(DEVICE)
        v = torch.randn(b, t, hkv, d, generator=g).to(DEVICE)
        n = n + t
        pos = (n.long() - t)[:, None] + torch.arange(t, device=DEVICE)
        slots = bt.long().gather(1, pos // bs) * bs + pos % bs
        for st, rows in ((ref_st, ref_rows), (ker_st, ker_rows)):
            st.write(k, v, slots, seq_lens=n, block_tables=bt, **rows)
        for x, y in zip(ref_st.tensors() + list(ref_rows.values()), ker_st.tensors() + list(ker_rows.values())):
            assert torch.equal(x, y), f"write differs after {n.tolist()} tokens"
        q = torch.randn(b, t, hkv * gqa, d, generator=g).to(DEVICE)
        if not INTERPRET and d // 4 < 16:
            continue  # the GPU kernel's dots need head_dim / 4 >= 16 (tl.dot K >= 16); writes still checked
        for window in (None, 11):
            out = ker_st.attend(q, bt, n, d ** -0.5, window, **ker_rows)
            ref = ref_st.attend(q, bt, n, d ** -0.5, window, **ref_rows)
            assert_close(f"kivi2 attention T={t} window={window}", ref, out, 1e-4)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("t", [1, 6])
def test_attention_sinks_and_window(fmt, t):
    """StreamingLLM's mask: the first ``sinks`` cached tokens plus a sliding window."""
    from constant_state.kernels.paged_attention.decode import paged_attention

    hkv, d, bs, lens = 2, 32, 8, [141, 60]
    m = -(-max(lens) // bs)
    n = 2 * m + 1
    g = torch.Generator().manual_seed(4)
    bt = torch.randperm(n, generator=g)[:2 * m].view(2, m).int()
    st = make_cache(fmt, n, bs, hkv, d)
    fill(st, lens, bt, hkv, d)
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    q = torch.randn(2, t, hkv * 4, d, generator=g).to(DEVICE, dtype)
    bt, seq = bt.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = paged_attention(q, cache_arg(st), bt, seq, d ** -0.5, 20, sinks=3)
    if hasattr(st, "cache"):
        ref = quant_paged_attention_ref(q, st.cache, bt, seq, d ** -0.5, 20, sinks=3)
    else:
        ref = paged_attention_ref(q, st.k, st.v, bt, seq, d ** -0.5, 20, sinks=3)
    assert_close(f"{fmt} sinks", ref, out, 2e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("bs", [8, 16])
@pytest.mark.parametrize("config", [None, (8, 4, 2), (16, 2, 2), (64, 4, 2)], ids=["default", "n8", "n16", "n64"])
@pytest.mark.parametrize("splits", [None, 3])
def test_kivi_decode_tiles_and_splits(bs, config, splits):
    """kivi2 decode over many tiles: tiles inside one block and tiles of several blocks (their key
    scales as column blocks), split contexts, the residual tail, against the reference."""
    from constant_state.cache.quant import kivi_name
    from constant_state.kernels.paged_attention.decode import paged_attention
    from constant_state.kernels.paged_attention.ref import kivi_write_ref

    if not INTERPRET and config is not None and config[0] < 16:
        pytest.skip("GPU dots need 16-token tiles")
    fmt = get_format(kivi_name(32, 16))
    hkv, b, d, gqa, m = 2, 2, 64, 4, 24
    g = torch.Generator().manual_seed(5)
    bt = torch.randperm(b * m + 3, generator=g)[:b * m].view(b, m).int().to(DEVICE)
    st = fmt.make_storage(b * m + 3, bs, hkv, d, DEVICE)
    rows = fmt.row_tensors(b, hkv, d, DEVICE)
    n = 0
    for t in (150, 7):  # 157 tokens: 144 flushed in 2-bit blocks, 13 in the fp16 residual window
        n += t
        seq = torch.full((b,), n, dtype=torch.int32, device=DEVICE)
        k = torch.randn(b, t, hkv, d, generator=g).to(DEVICE)
        v = torch.randn(b, t, hkv, d, generator=g).to(DEVICE)
        kivi_write_ref(st.cache, k, v, seq, bt, rows["res_k"], rows["res_v"])
    q = torch.randn(b, 1, hkv * gqa, d, generator=g).to(DEVICE)
    for window in (None, 40):
        ref = quant_paged_attention_ref(q, st.cache, bt, seq, d ** -0.5, window, **rows)
        out = paged_attention(q, st.cache, bt, seq, d ** -0.5, window, config=config, num_splits=splits, **rows)
        assert_close(f"kivi2 decode bs={bs} config={config} splits={splits} window={window}", ref, out, 1e-4)
