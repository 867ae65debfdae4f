"""The CUDA decode kernels' own source (csrc/paged_decode.cu) run on the CPU: compiled by the host C++
compiler against csrc/warp_emulation.h (each lane a thread, mma.sync / movmatrix / shuffles / the fp8
conversion emulated per the PTX ISA), launched with the same parameter block as on the GPU, and
compared with the reference on the dequantized cache. This checks the kernels' index mapping, masks,
splits, scales, offsets and kivi2's residual windows in CI; the GPU tests
(tests/gpu/test_paged_attention_gpu.py) check the hardware itself."""

import os
import shutil

import pytest
import torch
from helpers import KIVI2_DECODE_CASES, KIVI2_DECODE_IDS, bulk_serves, kivi2_decode_case, paired_serves

from constant_state.cache.formats import get_format
from constant_state.kernels.paged_attention import cuda_decode
from constant_state.kernels.paged_attention.decode import _cache_args
from constant_state.kernels.paged_attention.ref import (as_token_major, is_head_major, merge_splits_ref,
                                                         quant_paged_attention_ref, quant_write_ref)

TIGHT = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # output rounding and fp16 operands


@pytest.fixture(scope="module", autouse=True)
def emulated(tmp_path_factory):
    if cuda_decode.cuda_include() is None:
        pytest.skip("no CUDA headers (cuda_fp16.h) on this machine")
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONSTANT_STATE_CACHE", str(tmp_path_factory.mktemp("emulated_cache")))
        cuda_decode.emulated_library.cache_clear()
        yield cuda_decode.emulated_library()
    cuda_decode.emulated_library.cache_clear()


def run(fmt, lens, gqa, d, bs, window=None, sinks=0, qdtype=torch.bfloat16, num_splits=None, hkv=2, seed=0,
        staged=0, token_major=False, key_ramp=0.0, paired=None, bulk=None):
    gen = torch.Generator().manual_seed(seed)
    b, m = len(lens), -(-max(lens) // bs) + 1
    n = b * m + 5
    st = get_format(fmt).make_storage(n, bs, hkv, d, "cpu")
    every = torch.arange(n * bs).view(1, -1)  # valid codes everywhere first: masked tokens are not zeros
    quant_write_ref(st.cache, *(torch.randn(1, n * bs, hkv, d, generator=gen) for _ in range(2)), every)
    bt = torch.randperm(n, generator=gen)[:b * m].view(b, m).int()
    slots = (bt.long()[:, :, None] * bs + torch.arange(bs)).view(b, -1)
    k, v = (torch.randn(b, m * bs, hkv, d, generator=gen) for _ in range(2))
    quant_write_ref(st.cache, k * (1 + key_ramp * torch.arange(m * bs))[None, :, None, None], v, slots)
    q = torch.randn(b, 1, hkv * gqa, d, generator=gen).to(qdtype)
    seq = torch.tensor(lens, dtype=torch.int32)
    if token_major:  # the storage's head-major codes and scales as contiguous [N, BS, Hkv, ...] copies
        as_token_major(st.cache)
        assert st.cache.k.is_contiguous() and not is_head_major(st.cache.k)
    kind, _, group, tensors = _cache_args(st.cache)
    assert cuda_decode.KINDS[kind]
    assert cuda_decode.staged_for(kind, tensors[2], tensors[3], staged) == staged
    out = cuda_decode.decode_emulated(q, kind, group, tensors, bt, seq, d ** -0.5, window, sinks, num_splits,
                                      staged=staged, paired=paired, bulk=bulk)
    ref = quant_paged_attention_ref(q.float(), st.cache, bt, seq, d ** -0.5, window, sinks=sinks)
    err = (out.float() - ref).abs().max().item()
    assert err <= TIGHT[qdtype], f"{fmt}: emulated CUDA kernel vs reference {err:.3e}"


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4", "int4-g32"])
@pytest.mark.parametrize("case", [
    dict(lens=[300, 65, 70], gqa=4, d=128, bs=16, window=100, sinks=4),
    dict(lens=[301, 65], gqa=8, d=64, bs=32, window=40),
    dict(lens=[500, 1, 209], gqa=2, d=128, bs=64, num_splits=7),
    dict(lens=[199, 33], gqa=4, d=128, bs=16, qdtype=torch.float16),
    dict(lens=[16, 32, 17], gqa=5, d=64, bs=16, num_splits=1),
    dict(lens=[77], gqa=1, d=64, bs=16, num_splits=3, hkv=1),
], ids=["sinks-window", "window-bs32", "splits7-bs64", "fp16-queries", "one-split-gqa5", "mha-d64"])
@pytest.mark.parametrize("variant", ["direct", "unbulked", "unpaired", "staged"])
def test_emulated_cuda_decode(fmt, case, variant):
    """``direct``: the default kernel (int4, groups of 32 or 64, with at most 4 query heads per KV head:
    the paired loop, two tiles per step, fed by bulk copies of chunks in 16-token blocks); ``unbulked``: the paired loop's
    loads into registers where the bulk copies would serve; ``unpaired``: the one-tile loop where the
    paired one would serve; ``staged``: the variant whose tiles go through shared memory by cp.async
    (the emulation does each copy at the latest wait that covers it, so a stage read before its wait
    sees stale bytes)."""
    paired = int(variant in ("direct", "unbulked"))
    if variant == "unpaired" and not paired_serves(fmt, case):
        pytest.skip("the paired loop does not serve this case: direct runs the same kernel")
    if variant == "unbulked" and not bulk_serves(fmt, case):
        pytest.skip("no bulk copies in this case: direct runs the same kernel")
    run(fmt, **case, staged=int(variant == "staged"), paired=paired, bulk=int(variant == "direct"))


@pytest.mark.parametrize("fmt", ["int4", "int4-g32", "fp8", "kivi2"])
@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("hkv", [2, 1])
def test_chunks_feed_the_bulk_copies(fmt, bs, hkv):
    """int4 (groups of 32 or 64) in 16-token blocks and kivi2 in 32- and 64-token blocks are stored in chunks
    (ref.head_chunks) and their paired loops are fed by bulk copies (paired = 2); other formats and block
    sizes keep one tensor per part. A chunk cache copied into separate tensors runs the register loop,
    and the error names the part (int4 with groups of 32, whose paired loop runs only fed by bulk copies:
    the one-tile loop). One KV head: its head stride is any (a size-1 dimension)."""
    if fmt == "kivi2" and bs == 16:
        pytest.skip("kivi2's blocks are 32 or 64 tokens")
    st = get_format(fmt).make_storage(6, bs, hkv, 128, "cpu")
    kind, _, group, tensors = _cache_args(st.cache)
    chunked = (fmt, bs) in (("int4", 16), ("int4-g32", 16), ("kivi2", 32), ("kivi2", 64))
    if kind in ("int4", "kivi2"):
        assert (cuda_decode.chunk_error(kind, tensors) is None) == chunked
    unbulked = 0 if fmt == "int4-g32" else 1  # cuda_decode.BULK_PAIRED_GROUPS
    assert cuda_decode.bulk_for(kind, group, 1, tensors, bulk=1) == (2 if chunked else unbulked)
    assert cuda_decode.bulk_for(kind, group, 1, tensors, bulk=0) == unbulked
    assert cuda_decode.bulk_for(kind, group, 0, tensors, 1) == 0
    if chunked:
        c = st.cache
        assert len({t.untyped_storage().data_ptr() for t in st.tensors()}) == 1  # one allocation
        for name in ("k_zero", "v_scale"):
            kept = getattr(c, name)
            setattr(c, name, kept.clone())  # same logical layout, its own tensor
            _, _, _, tensors = _cache_args(c)
            assert cuda_decode.layout_error(kind, group, tensors, *_residual(c, kind)) is None
            assert name.replace("k_", "key ").replace("v_", "value ").replace("zero", "zero points") \
                .replace("scale", "scales") in cuda_decode.chunk_error(kind, tensors)
            assert cuda_decode.bulk_for(kind, group, 1, tensors, bulk=1) == unbulked
            setattr(c, name, kept)


def _residual(cache, kind):
    if kind != "kivi2":
        return ()
    return [torch.zeros(1, cache.residual, cache.k.shape[2], cache.head_dim, dtype=torch.float16) for _ in range(2)]


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_emulated_cuda_decode_token_major_is_refused(fmt):
    """The kernel is compiled for the storage's in-block layout (head-major codes and scales, constant
    strides inside a block): contiguous token-major copies are refused by name, and ``supports`` sends
    them to the Triton kernel."""
    with pytest.raises(ValueError, match="not head-major"):
        run(fmt, lens=[300, 65], gqa=4, d=128, bs=16, num_splits=3, token_major=True)


@pytest.mark.parametrize("fmt", ["fp8", "int4", "kivi2"])
def test_layout_error_names_the_tensor(fmt):
    st = get_format(fmt).make_storage(6, 32, 2, 128, "cpu")
    kind, _, group, tensors = _cache_args(st.cache)
    res = [torch.zeros(1, 64, 2, 128, dtype=torch.float16) for _ in range(2)]
    assert cuda_decode.layout_error(kind, group, tensors, *res) is None
    k, v, ks, vs, kz, vz = tensors
    assert "key codes" in cuda_decode.layout_error(kind, group, (k.contiguous(), v, ks, vs, kz, vz), *res)
    assert "scales" in cuda_decode.layout_error(kind, group, (k, v, ks, vs.contiguous(), kz, vz.contiguous()), *res)
    shifted = [x[1:] for x in tensors]  # blocks from the second on: still aligned
    assert cuda_decode.layout_error(kind, group, shifted, *res) is None
    span = 1 + sum((n - 1) * st for n, st in zip(k.shape, k.stride()))  # elements the strides reach
    flat = torch.zeros(span + 16, dtype=k.dtype)
    unaligned = flat[1:1 + span].as_strided(k.shape, k.stride())  # the storage's strides, odd address
    assert "aligned" in cuda_decode.layout_error(kind, group, (unaligned, v, ks, vs, kz, vz), *res)
    if fmt == "kivi2":
        assert "residual" in cuda_decode.layout_error(kind, group, tensors, res[0].float(), res[1])


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4", "kivi2"])
def test_emulated_cuda_decode_rising_scores(fmt):
    """Keys growing along the context (x 1 + pos / 20; kivi2 x 1 + pos / 200, whose fp16 query operand
    folds the key scales in and loses precision on larger scores): the running max keeps moving past
    the lazy rescale's slack (Softmax::SLACK), so tiles alternate between the full step with its
    rescale and the step against the old max."""
    if fmt != "kivi2":
        run(fmt, lens=[700, 301], gqa=4, d=128, bs=16, num_splits=2, key_ramp=0.05)
        return
    a, ref = kivi2_decode_case([700, 301], 4, 128, 32, key_ramp=0.005)
    kind, _, group, tensors = _cache_args(a["cache"])
    out = cuda_decode.decode_emulated(a["q"], kind, group, tensors, a["block_tables"], a["seq_lens"], a["scale"],
                                      None, 0, 2, a["res_k"], a["res_v"])
    err = (out.float() - ref).abs().max().item()
    assert err <= TIGHT[a["q"].dtype], f"kivi2: emulated CUDA kernel vs reference {err:.3e}"


def test_emulated_staged_kivi2_runs_the_direct_kernel():
    case = dict(KIVI2_DECODE_CASES[0])
    test_emulated_cuda_decode_kivi2(case, staged=1)


@pytest.mark.parametrize("index", [0, 3], ids=["residual-mixes", "g128-r64-sinks-window"])
def test_emulated_cuda_decode_kivi2_unpaired(index):
    """The one-tile-per-column loop on cases the paired loop serves by default (G <= 4)."""
    case = KIVI2_DECODE_CASES[index]
    assert paired_serves("kivi2", case)
    test_emulated_cuda_decode_kivi2(case, paired=0)


def test_unknown_kernel_is_an_error(emulated):
    params = cuda_decode._Params()
    assert emulated.cs_decode(params, 9, 128, 0, 1, 4, 0, None) == 1  # cudaErrorInvalidValue
    assert emulated.cs_decode(None, 1, 128, 0, 1, 4, 0, None) == 1
    params.g, params.paired, params.bs = 8, 1, 16  # the paired loop serves at most 4 query heads per KV head
    assert emulated.cs_decode(params, 3, 128, 64, 0, 4, 0, None) == 1
    params.g = 4
    assert emulated.cs_decode(params, 3, 128, 64, 0, 4, 0, None) == 0  # no work items: launches nothing


def test_merge_splits_ref_weights_by_max_and_sum():
    part = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    ml = torch.tensor([[0.0, 1.0], [1.0, 1.0], [float("-inf"), 0.0]])  # third split saw no token
    out = merge_splits_ref(part, ml, 3)
    torch.testing.assert_close(out, torch.tensor([[1 / 3, 2 / 3]]))


@pytest.mark.parametrize("fmt", ["int4", "int4-g32", "kivi2", "kivi2-bs64"])
@pytest.mark.parametrize("window", [None, 1300], ids=["full", "sinks-window"])
def test_emulated_bulk_loops_cross_block_table_windows(fmt, window):
    """One split of more than 64 chunks: the loops fed by bulk copies read their block-table entries 32
    chunks at a time (TileBlocks), the next 32 loaded a window ahead; with sinks and a sliding window the
    chunks jump from the sinks' to the window's blocks inside a window of entries."""
    bs = {"int4": 16, "int4-g32": 16, "kivi2": 32, "kivi2-bs64": 64}[fmt]
    fmt = "kivi2" if fmt.startswith("kivi2") else fmt
    case = dict(lens=[2250 if bs < 64 else 4300, 70], gqa=4, d=128, bs=bs, num_splits=1, hkv=1)
    if window is not None:
        case.update(window=window, sinks=20)
    assert bulk_serves(fmt, case)
    if fmt.startswith("int4"):
        run(fmt, **case, paired=1, bulk=1)
    else:
        test_emulated_cuda_decode_kivi2(case)


@pytest.mark.parametrize("index", [0, 3, 7], ids=["residual-mixes", "g128-r64-sinks-window", "bs64-g128-r64-sinks-window"])
def test_emulated_cuda_decode_kivi2_unbulked(index):
    """The paired loop's loads into registers (decode2_kernel) on chunk caches the bulk copies serve by
    default (decode2_bulk_kernel)."""
    case = KIVI2_DECODE_CASES[index]
    assert bulk_serves("kivi2", case)
    test_emulated_cuda_decode_kivi2(case, bulk=0)


@pytest.mark.parametrize("case", KIVI2_DECODE_CASES, ids=KIVI2_DECODE_IDS)
def test_emulated_cuda_decode_kivi2(case, staged=0, paired=None, bulk=None):
    """Default kernels: with at most 4 query heads per KV head the paired loop, fed by bulk copies of
    chunks in 32- or 64-token blocks (decode2_bulk_kernel); else the one-tile loop."""
    case = dict(case)
    num_splits = case.pop("num_splits", None)
    a, ref = kivi2_decode_case(**case)
    kind, _, group, tensors = _cache_args(a["cache"])
    out = cuda_decode.decode_emulated(a["q"], kind, group, tensors, a["block_tables"], a["seq_lens"], a["scale"],
                                      a["sliding_window"], a["sinks"], num_splits, a["res_k"], a["res_v"], staged,
                                      paired, bulk)
    err = (out.float() - ref).abs().max().item()
    assert err <= TIGHT[a["q"].dtype], f"kivi2: emulated CUDA kernel vs reference {err:.3e}"
