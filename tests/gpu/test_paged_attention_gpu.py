"""Paged-attention Triton kernels on the GPU, every format.

Twice per case (vLLM's scheme): against the reference run on the same (dequantized) cache — tight,
kernel error only — and against full-precision attention on the unquantized K/V — loose,
quantization error. Random non-contiguous block tables, odd lengths, GQA 1/4/8, head dims 64/128,
and a pool large enough that element offsets overflow 32 bits.
"""

import pytest
import torch
from helpers import KIVI2_DECODE_CASES, KIVI2_DECODE_IDS, bulk_serves, kivi2_decode_case, paired_serves

from constant_state.cache.formats import get_format
from constant_state.kernels.paged_attention.ref import QuantKV, paged_attention_ref, quant_paged_attention_ref

pytestmark = pytest.mark.gpu
FORMATS = ["bf16", "fp8", "int8", "int4", "int4-g32"]
# Max abs error of the output vs full precision (unit-variance K/V), per format.
LOOSE = {"bf16": 2e-2, "fp8": 0.3, "int8": 5e-2, "int4": 0.45, "int4-g32": 0.4}
TIGHT = 2e-2  # bf16 queries / outputs: kernel error only


def setup(fmt, lens, hkv, d, bs, num_blocks, gen, dev="cuda", key_ramp=0.0):
    st = get_format(fmt).make_storage(num_blocks, bs, hkv, d, dev)
    b = len(lens)
    m = -(-max(lens) // bs)
    bt = torch.randperm(num_blocks, generator=gen, device="cpu")[:b * m].view(b, m)
    # Put the last table entry at the end of the pool: offsets past 2^31 elements when the pool is large.
    bt[0, -1] = num_blocks - 1 if (num_blocks - 1) not in bt else bt[0, -1]
    bt = bt.int().to(dev)
    ramp = 1 + key_ramp * torch.arange(max(lens))[None, :, None, None]  # keys growing along the context
    kf = (torch.randn(b, max(lens), hkv, d, generator=gen) * ramp).to(dev, torch.bfloat16)
    vf = torch.randn(b, max(lens), hkv, d, generator=gen).to(dev, torch.bfloat16)
    pos = torch.arange(max(lens), device=dev)
    slots = bt.long().gather(1, (pos // bs)[None].expand(b, -1)) * bs + pos % bs  # [B, L]
    slots = torch.where(pos[None] < torch.tensor(lens, device=dev)[:, None], slots, -1)
    if isinstance(getattr(st, "cache", None), QuantKV):
        from constant_state.kernels.paged_attention.write import quant_write
        quant_write(st.cache, kf, vf, slots)
    else:
        ok = slots >= 0
        st.k.view(-1, hkv, d)[slots[ok]] = kf[ok]
        st.v.view(-1, hkv, d)[slots[ok]] = vf[ok]
    # Full-precision contiguous pool for the loose comparison.
    kd = torch.zeros(b * m, bs, hkv, d, device=dev)
    vd = torch.zeros(b * m, bs, hkv, d, device=dev)
    dense_bt = torch.arange(b * m, device=dev, dtype=torch.int32).view(b, m)
    for i, n in enumerate(lens):
        kd.view(-1, hkv, d)[i * m * bs:i * m * bs + n] = kf[i, :n].float()
        vd.view(-1, hkv, d)[i * m * bs:i * m * bs + n] = vf[i, :n].float()
    return st, bt, (kd, vd, dense_bt)


def run_case(fmt, t, lens, gqa, d, bs, window=None, num_blocks=None, hkv=2, seed=0, backend="auto", sinks=0,
             qdtype=torch.bfloat16, num_splits=None, key_ramp=0.0):
    """``backend``: decode.DECODE_BACKEND for the call (8-bit decode: the CUDA kernel or Triton);
    ``key_ramp``: keys x (1 + key_ramp x position), checked against the reference only."""
    from constant_state.kernels.paged_attention import decode
    from constant_state.kernels.paged_attention.decode import paged_attention

    gen = torch.Generator().manual_seed(seed)
    b = len(lens)
    num_blocks = num_blocks or (b * (-(-max(lens) // bs)) + 7)
    st, bt, (kd, vd, dbt) = setup(fmt, lens, hkv, d, bs, num_blocks, gen, key_ramp=key_ramp)
    q = torch.randn(b, t, hkv * gqa, d, generator=gen).to("cuda", qdtype)
    seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
    scale = d ** -0.5
    cache = st.cache if hasattr(st, "cache") else (st.k, st.v)
    saved, decode.DECODE_BACKEND = decode.DECODE_BACKEND, backend
    try:
        out = paged_attention(q, cache, bt, seq, scale, window, sinks=sinks, num_splits=num_splits)
    finally:
        decode.DECODE_BACKEND = saved
    if hasattr(st, "cache"):
        ref = quant_paged_attention_ref(q.float(), st.cache, bt, seq, scale, window, sinks=sinks)
    else:
        ref = paged_attention_ref(q.float(), st.k, st.v, bt, seq, scale, window, sinks)
    full = paged_attention_ref(q.float(), kd, vd, dbt, seq, scale, window, sinks)
    tight = (out.float() - ref.float()).abs().max().item()
    loose = (out.float() - full.float()).abs().max().item()
    assert tight <= TIGHT, f"{fmt}: kernel vs reference on the dequantized cache {tight:.3e}"
    assert key_ramp or loose <= LOOSE[fmt], f"{fmt}: kernel vs full precision {loose:.3e}"
    return st


@pytest.mark.parametrize("fmt", FORMATS + ["fp8:cuda", "int8:cuda", "int4:cuda", "int4-g32:cuda"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("lens", [[1], [777, 1], [4099, 333, 17]], ids=["L1", "L777", "L4099"])
def test_decode(fmt, gqa, d, lens):
    """Every format with the default backend; ``:cuda`` the CUDA decode kernel (cuda_decode)."""
    fmt, _, backend = fmt.partition(":")
    if backend == "cuda":
        _need_cuda_decode()
    run_case(fmt, 1, lens, gqa, d, 16, backend=backend or decode_backend())


def decode_backend():
    from constant_state.kernels.paged_attention import decode

    return decode.DECODE_BACKEND


def _need_cuda_decode():
    """Skip below compute capability 8.9; on newer GPUs the kernel must build (no silent fallback)."""
    from constant_state.kernels.paged_attention import cuda_decode

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the CUDA decode kernel needs compute capability 8.9 (fp8 conversions)")
    assert cuda_decode.available(torch.cuda.current_device()), cuda_decode._BUILD_ERRORS


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4", "int4-g32"])
@pytest.mark.parametrize("case", [
    dict(lens=[3001, 65, 700], gqa=4, d=128, bs=16, window=1024, sinks=4),
    dict(lens=[3001, 65], gqa=8, d=64, bs=32, window=100, sinks=0),
    dict(lens=[5000, 1, 2049], gqa=2, d=128, bs=64, num_splits=7),
    dict(lens=[4099, 333], gqa=4, d=128, bs=16, qdtype=torch.float16),
    dict(lens=[16, 32, 17], gqa=5, d=64, bs=16, num_splits=1),
], ids=["sinks-window", "window-bs32", "splits7-bs64", "fp16-queries", "one-split-gqa5"])
@pytest.mark.parametrize("variant", ["direct", "unbulked", "unpaired", "staged"])
def test_cuda_decode(fmt, case, variant, monkeypatch):
    """The CUDA decode kernel serves on this GPU (it must build: no silent Triton fallback) and
    matches the reference with sinks, windows, block sizes 16-64, split counts, GQA 2/4/5/8, fp16 queries;
    ``direct``: the default (int4 with G <= 4: the paired loop, fed by bulk copies of chunks in 16-token
    blocks), ``unbulked``: the paired loop's loads into registers where the bulk copies would serve,
    ``unpaired``: the one-tile loop where the paired one would serve, ``staged``: the variant that stages
    tiles through shared memory (cp.async)."""
    from constant_state.kernels.paged_attention import cuda_decode

    _need_cuda_decode()
    if variant == "unpaired" and not paired_serves(fmt, case):
        pytest.skip("the paired loop does not serve this case: direct runs the same kernel")
    if variant == "unbulked" and not bulk_serves(fmt, case):
        pytest.skip("no bulk copies in this case: direct runs the same kernel")
    monkeypatch.setattr(cuda_decode, "STAGED", int(variant == "staged"))
    monkeypatch.setattr(cuda_decode, "PAIRED", int(variant in ("direct", "unbulked")))
    monkeypatch.setattr(cuda_decode, "BULK", int(variant == "direct"))
    run_case(fmt, 1, backend="cuda", **case)


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4", "int4-g32", "kivi2"])
def test_cuda_decode_rising_scores(fmt, monkeypatch):
    """Keys growing along the context: the running max keeps moving past the lazy rescale's slack
    (paged_decode.cu, Softmax::SLACK), so tiles alternate between the full softmax step with its rescale
    and the step against the old max (kivi2 a gentler ramp: its fp16 query operand carries the key
    scales)."""
    from constant_state.kernels.paged_attention import decode

    _need_cuda_decode()
    if fmt != "kivi2":
        run_case(fmt, 1, [3001, 700], 4, 128, 16, backend="cuda", key_ramp=0.01)
        return
    monkeypatch.setattr(decode, "DECODE_BACKEND", "cuda")
    args, ref = kivi2_decode_case([3001, 700], 4, 128, 32, device="cuda", key_ramp=0.001)
    err = (decode.paged_attention(**args).float() - ref).abs().max().item()
    assert err <= TIGHT, f"kivi2 CUDA decode vs reference on the dequantized cache {err:.3e}"


@pytest.mark.parametrize("case", KIVI2_DECODE_CASES, ids=KIVI2_DECODE_IDS)
@pytest.mark.parametrize("variant", ["direct", "unbulked", "unpaired"])
def test_cuda_decode_kivi2(case, variant, monkeypatch):
    """kivi2 on the CUDA decode kernel (residual windows, group sizes 32-128, windows and sinks, splits);
    ``direct``: the default (G <= 4: the paired loop, fed by bulk copies of chunks in 32-token blocks),
    ``unbulked``: the paired loop's loads into registers where the bulk copies would serve,
    ``unpaired``: the one-tile-per-column loop where the paired one would serve."""
    from constant_state.kernels.paged_attention import cuda_decode, decode

    _need_cuda_decode()
    if variant == "unpaired" and not paired_serves("kivi2", case):
        pytest.skip("the paired loop does not serve this case: direct runs the same kernel")
    if variant == "unbulked" and not bulk_serves("kivi2", case):
        pytest.skip("no bulk copies in this case: direct runs the same kernel")
    monkeypatch.setattr(decode, "DECODE_BACKEND", "cuda")
    monkeypatch.setattr(cuda_decode, "PAIRED", int(variant != "unpaired"))
    monkeypatch.setattr(cuda_decode, "BULK", int(variant == "direct"))
    case = dict(case)
    num_splits = case.pop("num_splits", None)
    args, ref = kivi2_decode_case(**case, device="cuda")
    out = decode.paged_attention(**args, num_splits=num_splits)
    err = (out.float() - ref).abs().max().item()
    assert err <= TIGHT, f"kivi2 CUDA decode vs reference on the dequantized cache {err:.3e}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("t, lens, window", [(37, [37, 100], None), (129, [1000, 129], None), (63, [500, 70], 48)])
def test_prefill(fmt, t, lens, window):
    run_case(fmt, t, lens, 4, 128, 16, window=window)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_sliding_window_and_block_sizes(fmt):
    run_case(fmt, 1, [3001, 65], 8, 128, 32, window=1024)
    run_case(fmt, 1, [257, 9], 4, 64, 64)


@pytest.mark.parametrize("fmt", ["bf16", "int4", "fp8:cuda", "int4:cuda"])
def test_offsets_overflow_32_bits(fmt):
    """A pool whose last block starts past 2^31 elements (bf16: 131k blocks of 16x8x128, 8.6 GB)."""
    fmt, _, backend = fmt.partition(":")
    if backend == "cuda":
        _need_cuda_decode()
    hkv, d, bs = 8, 128, 16
    per_block = bs * hkv * d  # elements of codes per block (bf16) / bytes (fp8) / 2x bytes (int4)
    num_blocks = (2 ** 31) // per_block + 64
    if fmt == "int4":
        num_blocks = (2 ** 31) // (per_block // 2) + 64
    free, _ = torch.cuda.mem_get_info()
    need = get_format(fmt).page_bytes(bs, hkv, d) * num_blocks
    if need > 0.8 * free:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of GPU memory")
    st = run_case(fmt, 1, [300, 45], 4, d, bs, num_blocks=num_blocks, hkv=hkv, backend=backend or decode_backend())
    del st
    torch.cuda.empty_cache()


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_split_count_from_occupancy(fmt):
    """The quantized decode's default split count comes from the compiled kernel's occupancy, a whole
    number of programs per SM, and the result at that count matches the reference."""
    from constant_state.kernels.paged_attention import decode
    from constant_state.kernels.paged_attention.decode_quant import _quant_decode_kernel

    decode._OCCUPANCY.clear()
    run_case(fmt, 1, [4099, 333, 17], 4, 128, 16, backend="triton")
    slots = [v for k, v in decode._OCCUPANCY.items() if k[1] == _quant_decode_kernel.fn.__name__]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert slots and all(v % sms == 0 and 1 <= v // sms <= 32 for v in slots), slots


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_of_decode(backend, monkeypatch):
    """The decode launch reads seq_lens on the device only: capture once, replay at new lengths
    (Triton kernels and the ctypes-launched CUDA kernel alike)."""
    from constant_state.kernels.paged_attention import decode
    from constant_state.kernels.paged_attention.decode import paged_attention

    if backend == "cuda":
        _need_cuda_decode()
    monkeypatch.setattr(decode, "DECODE_BACKEND", backend)
    gen = torch.Generator().manual_seed(0)
    st, bt, _ = setup("int8", [2000, 2000], 2, 128, 16, 300, gen)
    q = torch.randn(2, 1, 8, 128, generator=gen).to("cuda", torch.bfloat16)
    seq = torch.tensor([100, 200], dtype=torch.int32, device="cuda")
    paged_attention(q, st.cache, bt, seq, 0.1)  # compile outside the graph
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = paged_attention(q, st.cache, bt, seq, 0.1)
    for lens in ([100, 200], [1999, 5], [2000, 2000]):
        seq.copy_(torch.tensor(lens))
        g.replay()
        ref = quant_paged_attention_ref(q.float(), st.cache, bt, seq, 0.1)
        assert (out.float() - ref).abs().max().item() <= TIGHT


def _kv_settings(fmt: str) -> dict:
    """``KVConfig`` settings of ``fmt``; ``kivi2@64``: kivi2 in 64-token blocks (kivi2: 32), its residual
    window one block."""
    fmt, _, bs = fmt.partition("@")
    kivi = {"residual_window": int(bs or 32), "block_size": int(bs or 32)} if fmt == "kivi2" else {}
    return dict(format=fmt, **kivi)


def _tiny_model(kv: dict):
    """A random 2-layer bf16 Transformer on the GPU (8 query / 2 KV heads of 64), its KV cache
    ``KVConfig(**kv)``."""
    import constant_state as cs
    from constant_state.models.config import TransformerConfig

    cfg = TransformerConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                            num_kv_heads=2, head_dim=64, dtype="bfloat16")
    m = cs.build_model(cfg, dtype="bfloat16", seed=0).to("cuda")
    m.kv_config = cs.KVConfig(**kv)
    return m


@pytest.mark.parametrize("fmt", FORMATS + ["kivi2"])
def test_generate_on_gpu(fmt):
    """The generate loop (prefill kernel, write kernel, decode kernel in a CUDA graph) vs the reference path."""
    m = _tiny_model(_kv_settings(fmt))
    ids = torch.randint(0, 256, (3, 50), generator=torch.Generator().manual_seed(0)).to("cuda")
    out = m.generate(ids, max_new_tokens=20)
    assert out.shape == (3, 70)
    # Logits of a kernel forward vs the forced-reference forward on the same model.
    s1 = m.init_state(3, max_context=50)
    s2 = m.init_state(3, max_context=50)
    for st in s2.kv_pool.storages.values():
        st.backend = "ref"
    a, _ = m(ids, s1)
    b, _ = m(ids, s2)
    assert (a.float() - b.float()).abs().max().item() <= 0.1


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4", "kivi2", "kivi2@64"])
def test_model_decode_step_cuda_kernel(fmt, monkeypatch):
    """A model's decode steps through the CUDA decode kernel (CONSTANT_STATE_DECODE=cuda) give the logits
    of the same steps through the Triton kernel (same weights, same prompt, same cache format; kivi2@64:
    64-token blocks, which the CUDA kernel's 64-token bulk loop serves)."""
    from constant_state.kernels.paged_attention import decode

    _need_cuda_decode()
    m = _tiny_model(_kv_settings(fmt))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 70), generator=gen).to("cuda")
    steps = torch.randint(0, 256, (3, 5), generator=gen).to("cuda")
    logits = {}
    for backend in ("triton", "cuda"):
        monkeypatch.setattr(decode, "DECODE_BACKEND", backend)
        state = m.init_state(3, max_context=80)
        with torch.inference_mode():
            m(ids, state)
            logits[backend] = torch.stack([m(steps[:, i:i + 1], state)[0][:, -1].float() for i in range(5)])
    a, b = logits["triton"], logits["cuda"]
    assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item(), fmt


@pytest.mark.parametrize("backend", ["triton", "cuda", "cuda-bs64"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_kivi2(gqa, d, backend, monkeypatch):
    """KIVI 2-bit: a 1500-token prefill then decode steps across a flush, kernels vs the reference
    path (bit-equal blocks and residual windows; attention tight) and vs full precision (loose).
    ``cuda``: decode steps on the CUDA decode kernel (blocks of 32 tokens; ``cuda-bs64``: 64)."""
    from constant_state.cache.quant import kivi_name
    from constant_state.kernels.paged_attention import decode
    from constant_state.kernels.paged_attention.ref import paged_attention_ref

    backend, _, bs64 = backend.partition("-")
    if backend == "cuda":
        _need_cuda_decode()
    monkeypatch.setattr(decode, "DECODE_BACKEND", backend)
    fmt = get_format(kivi_name(64, 128))
    hkv, bs, b = 2, (64 if bs64 else 32) if backend == "cuda" else 16, 3
    m = 2048 // bs
    n_blocks = b * m + 11
    gen = torch.Generator().manual_seed(0)
    bt = torch.randperm(n_blocks, generator=gen)[:b * m].view(b, m).int().cuda()
    sts = [fmt.make_storage(n_blocks, bs, hkv, d, "cuda") for _ in range(2)]
    sts[1].backend = "ref"
    rows = [fmt.row_tensors(b, hkv, d, "cuda") for _ in range(2)]
    n = torch.zeros(b, dtype=torch.int32, device="cuda")
    kall, vall = [], []
    for t in [1501, 1, 1, 130, 1]:
        k = torch.randn(b, t, hkv, d, generator=gen).cuda()
        v = torch.randn(b, t, hkv, d, generator=gen).cuda()
        kall.append(k)
        vall.append(v)
        n = n + t
        pos = (n.long() - t)[:, None] + torch.arange(t, device="cuda")
        slots = bt.long().gather(1, pos // bs) * bs + pos % bs
        for st, r in zip(sts, rows):
            st.write(k, v, slots, seq_lens=n, block_tables=bt, **r)
        for x, y in zip(sts[0].tensors() + list(rows[0].values()), sts[1].tensors() + list(rows[1].values())):
            assert torch.equal(x, y)
        q = torch.randn(b, t, hkv * gqa, d, generator=gen).to("cuda", torch.bfloat16)
        out = sts[0].attend(q, bt, n, d ** -0.5, None, **rows[0])
        ref = sts[1].attend(q.float(), bt, n, d ** -0.5, None, **rows[1])
        assert (out.float() - ref).abs().max().item() <= TIGHT
        kf, vf = torch.cat(kall, 1), torch.cat(vall, 1)  # [B, n, H, D] full precision
        full = paged_attention_ref(q.float(), kf, vf, torch.arange(b, device="cuda")[:, None].int(), n, d ** -0.5)
        # 2-bit error: early queries of the prefill average few keys, so compare the RMS error.
        rms = (out.float() - full).pow(2).mean().sqrt().item()
        assert rms <= 0.25, f"kivi2 vs full precision: RMS error {rms:.3f}"


@pytest.mark.parametrize("kv", [dict(format="bf16", eviction="streaming", sink_tokens=4, window_tokens=60),
                                dict(format="int8", eviction="h2o", budget=64, window_tokens=32),
                                dict(format="int4", eviction="streaming")], ids=["streaming-bf16", "h2o-int8",
                                                                                "streaming-int4"])
def test_generate_with_eviction_on_gpu(kv):
    """Eviction through the generate loop on the GPU: CUDA-graph decode equals eager decode, memory
    stays bounded, and every block returns to the pool."""
    m = _tiny_model(kv)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0)).to("cuda")
    a, st = m.generate(ids, max_new_tokens=150, return_state=True)
    b = m.generate(ids, max_new_tokens=150, cuda_graph=False)
    assert (a == b).float().mean().item() >= 0.95  # bf16 graph vs eager: identical up to rare ties
    pool = st.kv_pool.manager.pool
    assert pool.num_used <= 2 * (-(-max(kv.get("window_tokens", 1020), kv.get("budget", 0)) // 16) + 3)
    with torch.inference_mode():
        st.release()
    assert pool.num_free == pool.num_blocks


def test_warp_timeline_diagnostic():
    """benchmarks/warp_timeline.py: the CS_TIMELINE build records every warp of a launch (runs within the
    span, on real SMs) beside the graph time."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from constant_state.kernels.paged_attention import cuda_decode

    if not cuda_decode.available(0):
        pytest.skip("CUDA decode kernel unavailable")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "warp_timeline.py", "fp8", "int4", "--shapes", "2x4096"],
                          cwd=root / "benchmarks", capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": f"{root}:{root / 'benchmarks'}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith(("| fp8", "| int4"))]
    assert len(rows) == 2, proc.stdout
    header = [h.strip() for h in next(x for x in proc.stdout.splitlines() if x.startswith("| format")).split("|")[1:-1]]
    for r in rows:
        row = dict(zip(header, (c.strip() for c in r)))
        assert 0 < float(row["span_us"]) < 2 * float(row["graph_us"]), row  # one launch vs the graph's median
        assert float(row["run_min"]) <= float(row["run_max"]) <= float(row["span_us"]), row
        assert 0 < int(row["sms"]) <= torch.cuda.get_device_properties(0).multi_processor_count, row
