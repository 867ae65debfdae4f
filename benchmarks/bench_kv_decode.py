"""Paged KV formats on the GPU: decode-attention time and bandwidth, end-to-end decode, capacity.

Three tables (markdown), all in one run on one GPU:

1. Decode attention, one layer, 32 query heads / 8 KV heads / head dim 128, for every format at
   batch 1, 8, 32 and context 4k, 32k, 128k, beside ``F.scaled_dot_product_attention`` on a
   contiguous bf16 cache (``enable_gqa=True``; torch picks cuDNN on the H200). Both are captured in
   CUDA graphs and timed by CUDA events around each replay (median over about 100 ms of replays),
   the L2 emptied before each by reading a 256 MB buffer (``--flush read``; ``--flush write`` zeroes
   it as ``triton.testing.do_bench`` does, which leaves dirty lines for the timed kernel to write back).
   Bandwidth = bytes the kernel must read (codes, scales, zero points, queries, block tables) / time.
   ``kernel_us`` / ``kernel_tb_s``: the same call's kernels' own device time (``torch.profiler``,
   plain launches, L2 emptied the same way), without the graph's launch cost and the gap between a
   split decode's two kernels: the rate the kernels stream at (``--no-kernel-time`` leaves it out).
2. End-to-end decode tokens/s of a random Llama-3-8B-shaped model at batch 32, context 32k, per
   format (one decode step as a CUDA graph; the context is reserved, not prefilled: a decode step's
   cost does not depend on the cached values). Formats whose 32 x 32k cache does not fit next to
   the weights run at the largest batch that fits, and say so.
3. Capacity: the largest number of 32k-token Llama-3-8B sequences whose KV cache can be allocated
   within a fixed budget (default 100 GiB, enforced with ``set_per_process_memory_fraction``).

    python benchmarks/bench_kv_decode.py                 # everything
    python benchmarks/bench_kv_decode.py --only attn --formats bf16,int4
    python benchmarks/bench_kv_decode.py --only attn --only e2e --formats int4:triton,int4:cuda

A format may carry a decode backend, ``fp8:cuda`` / ``fp8:triton`` (``decode.DECODE_BACKEND`` for
its rows: the CUDA warp-per-split kernel of ``cuda_decode`` or the Triton one); without one the
default backend runs; and a block size, ``kivi2@64`` (kivi2's key groups are its blocks: 64-token
groups, 9% fewer bytes than the default 32 and coarser keys, benchmarks/kv_accuracy.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math

import torch
import torch.nn.functional as F

import constant_state as cs
from constant_state.cache.formats import get_format
from constant_state.kernels.paged_attention import decode as decode_mod
from constant_state.models.config import PRESETS
from constant_state.state import ModelState, spec_bytes_per_sequence

HQ, HKV, D, BS = 32, 8, 128, 16
DEVICE = "cuda"  # --smoke: "cpu" under TRITON_INTERPRET=1, tiny shapes, no graphs
FORMATS = ["bf16", "fp8", "int8", "int4", "int4-g32", "kivi2", "kivi2@64"]


# How bench_graph empties the L2 before each timed replay (--flush): "read" sums a 256 MB buffer, so
# the L2 holds its clean lines; "write" zeroes it, as triton.testing.do_bench does, so the L2 holds
# dirty lines whose write-backs the timed kernel pays as it evicts them: 6 to 10 us more per call
# for every kernel here, SDPA included (H200, docs/benchmarks.md, twentieth session;
# benchmarks/flush_probe.py). "write+read" does both; "none" leaves the L2 as the last replay left it.
FLUSH = "read"
FLUSHES = ("read", "write", "write+read", "none")


def l2_flush(mode: str):
    """A function that empties the L2 as ``mode`` (one of :data:`FLUSHES`) says, through a 256 MB fp32
    buffer: "write" zeroes it, "read" sums it into one scalar (one reduction kernel: it reads the buffer
    and writes nothing else)."""
    if mode not in FLUSHES:
        raise ValueError(f"FLUSH (--flush) must be one of {FLUSHES}, got {mode!r}")
    buf = torch.zeros(256 * 2 ** 20 // 4, dtype=torch.float32, device=DEVICE)
    sink = torch.empty((), dtype=torch.float32, device=DEVICE)

    def flush():
        if "write" in mode:
            buf.zero_()
        if "read" in mode:
            torch.sum(buf, dim=0, out=sink)

    return flush


def bench_graph(fn, warmup: int = 3, rep_ms: float = 100.0) -> float:
    """Median microseconds of ``fn`` replayed from a CUDA graph (no host launch cost), the L2 emptied
    before each replay (:data:`FLUSH`), over about ``rep_ms`` of replays (50 to 1000), CUDA events
    around each replay alone."""
    import time

    if DEVICE == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    flush = l2_flush(FLUSH)

    def timed(n: int) -> list[float]:
        events = []
        for _ in range(n):
            flush()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.replay()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]  # ms

    est = sorted(timed(10))[5]
    n = max(50, min(1000, int(rep_ms / max(est, 1e-3))))
    t = sorted(timed(n))
    return t[len(t) // 2] * 1e3


def kernel_us(fn, n: int = 50) -> float | None:
    """Median over ``n`` calls of ``fn`` of the summed device durations of the kernels one call runs
    (CUDA activity of ``torch.profiler``: launch gaps, graph overhead and host time excluded), each
    call a plain launch after the L2 is emptied by reading a 256 MB buffer. ``bench_graph`` times the
    whole call; this is the time the kernels themselves stream for. None on CPU."""
    if DEVICE == "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    flush = l2_flush("read")

    def kernels(body) -> list:
        with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
            body()
            torch.cuda.synchronize()
        ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sorted(ev, key=lambda e: e.time_range.start)

    for _ in range(3):
        fn()
    flush_names = {e.name for e in kernels(flush)}
    calls: list[float] = []  # a call: the kernels after a flush's kernels
    after_flush = False
    for e in kernels(lambda: [(flush(), fn()) for _ in range(n)]):
        if e.name in flush_names:
            after_flush = True
            continue
        if after_flush:
            calls.append(0.0)
            after_flush = False
        if calls:
            calls[-1] += e.time_range.elapsed_us()
    if len(calls) != n:
        raise RuntimeError(f"kernel_us: {len(calls)} calls profiled for {n}; a call ran a flush kernel's name?")
    calls.sort()
    return calls[n // 2]


def kernel_cols(fn, nbytes: int, on: bool) -> dict:
    """``kernel_us`` (:func:`kernel_us`) and the bandwidth over it, for a row of the attention table."""
    ku = kernel_us(fn) if on else None
    if ku is None:
        return {}
    return dict(kernel_us=ku, kernel_tb_s=nbytes / ku / 1e6)


def sdpa_case(q: torch.Tensor, ctx: int):
    """The baseline of ``q [B, 1, HQ, D]`` over ``ctx`` tokens: ``(call, bytes)``, ``call`` running
    ``F.scaled_dot_product_attention`` (``enable_gqa``) on a random contiguous bf16 cache
    ``[B, HKV, ctx, D]`` that it holds, ``bytes`` the keys', values' and queries' bytes."""
    k = torch.randn(q.shape[0], HKV, ctx, D, device=q.device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    qs = q.transpose(1, 2)
    return (lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True)), 2 * k.numel() * 2 + q.numel() * 2


def block_size(fmt: str) -> int:
    """The block size of ``fmt[@bs]`` (e.g. ``kivi2@64``): ``bs`` if given, else the format's default
    (``KVConfig``): kivi2 quantizes keys per channel over a block, and 32-token blocks halve its
    key-scale bytes; other formats 16."""
    name, _, bs = fmt.partition("@")
    return int(bs) if bs else 32 if name.startswith("kivi2") else BS


def format_name(fmt: str) -> str:
    """The format of ``fmt[@bs]``."""
    return fmt.partition("@")[0]


def random_storage(fmt: str, num_blocks: int, batch: int, bs: int | None = None):
    """A storage of ``num_blocks`` blocks filled with random codes and plausible scales, and the
    per-row tensors of formats that have them (kivi2's residual windows)."""
    f = get_format(format_name(fmt))
    st = f.make_storage(num_blocks, bs or block_size(fmt), HKV, D, DEVICE)
    rows = f.row_tensors(batch, HKV, D, DEVICE)
    for t in st.tensors() + list(rows.values()):
        if t.dtype == torch.float16:
            t.copy_(torch.rand_like(t) * 0.02 + 0.001)
        elif t.dtype in (torch.bfloat16, torch.float32):
            t.normal_()
        else:
            u = t.view(torch.uint8)
            u.random_(0, 256)
            if t.dtype == torch.float8_e4m3fn:
                u.bitwise_and_(0xB7)  # no NaN codes
    return st, rows


@contextlib.contextmanager
def backend_of(spec: str):
    """``fmt[:backend]`` -> the format name, with ``decode.DECODE_BACKEND`` set inside the block."""
    fmt, _, backend = spec.partition(":")
    saved = decode_mod.DECODE_BACKEND
    decode_mod.DECODE_BACKEND = backend or saved
    try:
        yield fmt
    finally:
        decode_mod.DECODE_BACKEND = saved


def best_tuned(tune_rows) -> dict:
    """Fastest (config, num_splits) per format from ``tune_table`` rows."""
    best = {}
    for r in tune_rows:
        if r.get("impl") not in (None, "transposed") and r["format"] != "bf16":
            continue  # attn runs the default kernel: only its configs are candidates
        if r["us"] == r["us"] and (r["format"] not in best or r["us"] < best[r["format"]][0]):
            best[r["format"]] = (r["us"], eval(r["config"]), r["splits"] or None)
    return {f: dict(config=c, num_splits=n) for f, (_, c, n) in best.items()}


def attn_table(formats, batches, contexts, tuned=None, kernel_time: bool = True) -> list[dict]:
    from constant_state.kernels.paged_attention.decode import paged_attention

    rows = []
    for ctx in contexts:
        for b in batches:
            q = torch.randn(b, 1, HQ, D, device=DEVICE, dtype=torch.bfloat16)
            seq = torch.full((b,), ctx, dtype=torch.int32, device=DEVICE)
            sdpa, sdpa_bytes = sdpa_case(q, ctx)  # cuDNN / SDPA baseline on a contiguous bf16 cache
            us = bench_graph(sdpa)
            rows.append(dict(impl="sdpa-bf16-contiguous", batch=b, context=ctx, us=us,
                             bytes=sdpa_bytes, tb_s=sdpa_bytes / us / 1e6, vs_sdpa=1.0,
                             **kernel_cols(sdpa, sdpa_bytes, kernel_time)))
            del sdpa
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            for spec in formats:
                with backend_of(spec) as fmt:
                    bs = block_size(fmt)
                    m = ctx // bs
                    st, extra = random_storage(fmt, b * m, b)
                    bt = torch.randperm(b * m, device=DEVICE).int().view(b, m)  # non-contiguous blocks
                    cache = st.cache if hasattr(st, "cache") else (st.k, st.v)
                    kw = dict((tuned or {}).get(spec, {}), **extra)
                    call = lambda: paged_attention(q, cache, bt, seq, D ** -0.5, **kw)  # noqa: E731
                    t = bench_graph(call)
                    # Bytes read: every block (codes, scales, zeros; kivi2's residual holds ctx % R tokens).
                    res = (ctx % st.cache.residual) * HKV * D * 2 * 2 * b if extra else 0
                    nbytes = (b * m * get_format(format_name(fmt)).page_bytes(bs, HKV, D) + res
                              + q.numel() * 2 * 2 + bt.numel() * 4)
                    kcols = kernel_cols(call, nbytes, kernel_time)
                rows.append(dict(impl=f"paged-{spec}", batch=b, context=ctx, us=t, bytes=nbytes,
                                 tb_s=nbytes / t / 1e6, vs_sdpa=t / us, **kcols))
                del st, bt
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
            cols = ["impl", "batch", "context", "us", "bytes", "tb_s", "vs_sdpa"]
            if "kernel_us" in rows[-1]:
                cols += ["kernel_us", "kernel_tb_s"]
            print_rows(rows[-1 - len(formats):], cols)
    return rows


# Quantized formats: (BLOCK_N, num_warps, num_stages) of decode_quant (kivi2: BLOCK_N <= its block size);
# bf16: of the general kernel.
TUNE_CONFIGS = {
    "dense": [(64, 4, 2), (64, 4, 3), (128, 8, 3)],
    "fp8": [(128, 4, 3, 168), (128, 4, 3, 192), (128, 4, 2, 168)],
    "int8": [(128, 4, 3, 168), (128, 4, 3, 192), (128, 4, 2, 168)],
    "int4": [(64, 2, 3), (64, 2, 3, 192), (128, 4, 3, 192)],
    "kivi2": [(64, 2, 3), (64, 2, 3, 192), (64, 2, 4)],
}


def default_config(kind: str):
    from constant_state.kernels.paged_attention import decode, decode_quant

    if kind != "dense" and decode.QUANT_DECODE == "transposed":
        return decode_quant.TILE_CONFIGS[kind]
    return decode.TILE_CONFIGS[(kind, True)]


def tune_table(formats, batch: int, ctx: int, configs=None, splits=(2, 8, 16)) -> list[dict]:
    """Decode-attention time per tile config (BLOCK_N, num_warps, num_stages) and format, to pick
    ``decode_quant.TILE_CONFIGS`` (``decode.TILE_CONFIGS`` for bf16) on this GPU; then the default
    config at several split counts (``splits=0``: the shape heuristic); quantized formats also
    through the general kernel (``impl=general``, its default config), for comparison."""
    from constant_state.kernels.paged_attention import decode
    from constant_state.kernels.paged_attention.decode import paged_attention

    rows = []
    q = torch.randn(batch, 1, HQ, D, device=DEVICE, dtype=torch.bfloat16)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
    for fmt in formats:
        bs = block_size(fmt)
        m = ctx // bs
        st, extra = random_storage(fmt, batch * m, batch)
        bt = torch.randperm(batch * m, device=DEVICE).int().view(batch, m)
        cache = st.cache if hasattr(st, "cache") else (st.k, st.v)
        kind = getattr(getattr(st, "cache", None), "kind", "dense")
        nbytes = batch * m * get_format(format_name(fmt)).page_bytes(bs, HKV, D)
        default = default_config(kind)
        runs = [("transposed" if kind != "dense" else "general", cfg, None) for cfg in (configs or TUNE_CONFIGS[kind])]
        runs += [(runs[0][0], default, n) for n in splits if n != 0]
        if kind in ("fp8", "int8"):
            runs.append(("transposed-blocks", default, None))  # decode_quant.EIGHT_BIT_BLOCKS = True
        if kind != "dense":
            runs.append(("general", None, None))
        for impl, cfg, n in runs:
            from constant_state.kernels.paged_attention import decode_quant

            decode.QUANT_DECODE = "transposed" if impl.startswith("transposed") else impl
            decode_quant.EIGHT_BIT_BLOCKS = impl == "transposed-blocks"
            try:
                us = bench_graph(lambda: paged_attention(q, cache, bt, seq, D ** -0.5, config=cfg, num_splits=n,
                                                         **extra))
                note = ""
            except Exception as e:  # a config that does not compile (shared memory, registers)
                us, note = float("nan"), type(e).__name__
            finally:
                decode.QUANT_DECODE = "transposed"
                decode_quant.EIGHT_BIT_BLOCKS = False
            rows.append(dict(format=fmt, impl=impl, config=str(cfg or decode.TILE_CONFIGS[(kind, True)]),
                             splits=n or 0, us=us, tb_s=nbytes / us / 1e6,
                             default=impl == runs[0][0] and cfg == default and n is None, note=note))
        print_rows([r for r in rows if r["format"] == fmt], ["format", "impl", "config", "splits", "us", "tb_s",
                                                             "default", "note"])
        del st, bt
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def random_llama(preset: str):
    """Llama-shaped model with random bf16 weights, initialised on the GPU (fast for 8B)."""
    from constant_state.models.transformer import Transformer

    cfg = PRESETS[preset]
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=DEVICE).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    model.tie_weights()
    return model.eval()


@torch.inference_mode()
def e2e_table(formats, preset: str, batch: int, context: int) -> list[dict]:
    model = random_llama(preset)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for spec in formats:
        with backend_of(spec) as fmt:
            rows.append(e2e_row(model, weights, fmt, spec, batch, context))
        print_rows(rows[-1:], list(rows[-1]))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows


def e2e_row(model, weights: int, fmt: str, spec: str, batch: int, context: int) -> dict:
    """One decode step of ``model`` at ``batch x context`` in format ``fmt`` (``spec``: its table name)."""
    kv = cs.KVConfig(format=format_name(fmt), block_size=block_size(fmt))
    per_seq = spec_bytes_per_sequence(model.state_specs(kv), context + BS)
    free = torch.cuda.mem_get_info()[0] - 6 * 2 ** 30 if DEVICE == "cuda" else 2 ** 40  # minus activations
    b = min(batch, max(1, free // per_seq))
    state = model.init_state(b, max_context=context + block_size(fmt), kv=kv)
    state.reserve(context)  # the context, not prefilled: values do not change a step's cost
    state.advance(context)
    state.reserve(1)
    base = state.seq_lens.clone()
    ids = torch.zeros((b, 1), dtype=torch.long, device=DEVICE)

    def step():
        state.seq_lens.copy_(base)
        return model.forward_reserved(ids, state, last_only=True)

    us = bench_graph(step)
    state.release()
    del state
    return dict(format=spec, block_size=block_size(fmt), batch=b, context=context, step_ms=us / 1e3,
                tok_s=b / (us / 1e6), kv_gib=b * per_seq / 2 ** 30, weights_gib=weights / 2 ** 30,
                note="" if b == batch else f"{batch} x {context} does not fit next to the weights")


def capacity_table(formats, preset: str, context: int, budget_gib: float) -> list[dict]:
    """Largest n with ``init_state(n, context)`` allocatable under a memory fraction of ``budget_gib``."""
    cfg = PRESETS[preset]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * 2 ** 30 / total))
    rows = []
    for fmt in formats:
        specs = cfg.state_specs(cs.KVConfig(format=format_name(fmt), block_size=block_size(fmt)))
        per_seq = spec_bytes_per_sequence(specs, context)
        lo, hi = 0, int(budget_gib * 2 ** 30 // per_seq) + 2

        def fits(n: int) -> bool:
            try:
                st = ModelState.allocate(specs, n, max_context=context, device=DEVICE)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                return False
            del st
            torch.cuda.empty_cache()
            return True

        while lo + 1 < hi:  # fits(lo), not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        rows.append(dict(format=fmt, block_size=block_size(fmt), context=context, budget_gib=budget_gib, sequences=lo,
                         per_seq_gib=per_seq / 2 ** 30, formula=int(budget_gib * 2 ** 30 // per_seq)))
        print_rows(rows[-1:], list(rows[-1]))
    torch.cuda.set_per_process_memory_fraction(1.0)
    return rows


HF_BACKENDS = [("fp8", {}), ("quanto", dict(nbits=4, q_group_size=64, residual_length=128)),
               ("quanto", dict(nbits=2, q_group_size=64, residual_length=128))]


@torch.inference_mode()
def hf_quantized_table(preset: str, batch: int, context: int, steps: int = 3) -> list[dict]:
    """Hugging Face ``LlamaForCausalLM`` (random weights, same shape) decoding with its
    ``QuantizedCache`` for each backend that imports here: the cache is filled with ``context``
    random tokens per layer through ``cache.update`` (quantized once, as a prefill would), then
    ``steps`` eager decode steps are timed (median). HF keeps no paged layout and dequantizes each
    layer's whole history at every step; this is the baseline the issue names."""
    import statistics
    import time

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.cache_utils import QuantizedCache

    c = PRESETS[preset]
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                         num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                         rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                         max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    def sync():
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    rows = []
    for backend, kw in HF_BACKENDS:
        name = f"hf-quantized-{backend}" + (f"-{kw['nbits']}bit" if "nbits" in kw else "")
        try:
            cache = QuantizedCache(backend, hf_cfg, **kw)
            for layer in range(c.num_layers):
                k = torch.randn(batch, c.num_kv_heads, context, c.head_dim, device=DEVICE, dtype=torch.bfloat16)
                cache.update(k, torch.randn_like(k), layer)
                del k
            ids = torch.zeros((batch, 1), dtype=torch.long, device=DEVICE)
            times = []
            for i in range(steps + 1):
                pos = torch.tensor([context + i], device=DEVICE)
                sync()
                t0 = time.perf_counter()
                model(ids, past_key_values=cache, use_cache=True, cache_position=pos)
                sync()
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times[1:]) * 1e3
            rows.append(dict(impl=name, batch=batch, context=context, step_ms=ms, tok_s=batch / (ms / 1e3),
                             peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else 0.0, note=""))
        except Exception as e:  # a backend that does not import or run here: say why
            rows.append(dict(impl=name, batch=batch, context=context, step_ms=float("nan"), tok_s=float("nan"),
                             peak_gib=float("nan"), note=f"{type(e).__name__}: {str(e)[:150]}"))
        print_rows(rows[-1:], list(rows[-1]))
        cache = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[dict], cols: list[str]) -> None:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["attn", "e2e", "capacity", "tune", "hf"], action="append",
                   help="parts to run (default attn, e2e, capacity, hf; tune sweeps tile configs)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", default="4096,32768,131072")
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--e2e-batch", type=int, default=32)
    p.add_argument("--e2e-context", type=int, default=32768)
    p.add_argument("--budget-gib", type=float, default=100.0)
    p.add_argument("--tune-batch", type=int, default=32)
    p.add_argument("--attn-from-tune", action="store_true", help="attn with the fastest tuned config per format")
    p.add_argument("--json", default=None, help="write all rows to this file")
    p.add_argument("--smoke", action="store_true", help="CPU check (set TRITON_INTERPRET=1)")
    p.add_argument("--flush", choices=FLUSHES, default="read",
                   help="how the L2 is emptied before each timed replay (see FLUSH)")
    p.add_argument("--no-kernel-time", action="store_true",
                   help="attn: leave out the kernels' own time (kernel_us: profiler, see kernel_us)")
    a = p.parse_args()
    global FLUSH
    FLUSH = a.flush
    if a.smoke:  # a CPU check of this script: tiny shapes through the Triton interpreter
        global DEVICE
        DEVICE = "cpu"
        plain = list(dict.fromkeys(f.partition(":")[0] for f in a.formats.split(",")))
        out = {"tune": tune_table(plain, 1, 64, configs=[(16, 4, 2), (32, 4, 2)], splits=(1, 2)),
               "attn": attn_table(a.formats.split(","), [1, 2], [64, 128]),
               "e2e": e2e_table(a.formats.split(","), "tiny-llama", 2, 40),
               "hf": hf_quantized_table("tiny-llama", 2, 40)}
        print(json.dumps(out)[:200])
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_kv_decode.py needs a CUDA device")
    formats = a.formats.split(",")
    plain = list(dict.fromkeys(f.partition(":")[0] for f in formats))  # without backends (tune, capacity)
    only = set(a.only or ["attn", "e2e", "capacity", "hf"])
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if "tune" in only:
        print(f"## Tile configs, decode attention, batch {a.tune_batch}, context 32k\n")
        out["tune"] = tune_table(plain, a.tune_batch, 32768)
    if "attn" in only:
        print("## Decode attention, one layer (32 q heads, 8 KV heads, head dim 128)\n")
        tuned = best_tuned(out["tune"]) if a.attn_from_tune and "tune" in out else None
        if tuned:
            print(f"(tile config and splits per format from the tune above: {tuned})\n")
        out["attn"] = attn_table(formats, [int(x) for x in a.batches.split(",")],
                                 [int(x) for x in a.contexts.split(",")], tuned, not a.no_kernel_time)
    if "e2e" in only:
        print(f"## End-to-end decode, random {a.preset}, batch {a.e2e_batch}, context {a.e2e_context}\n")
        out["e2e"] = e2e_table(formats, a.preset, a.e2e_batch, a.e2e_context)
    if "hf" in only:
        print(f"## Hugging Face QuantizedCache, random {a.preset}, batch {a.e2e_batch}, context {a.e2e_context}\n")
        out["hf"] = hf_quantized_table(a.preset, a.e2e_batch, a.e2e_context)
    if "capacity" in only:
        print(f"## Capacity: {a.preset} sequences of {a.e2e_context} tokens in {a.budget_gib:g} GiB of KV\n")
        out["capacity"] = capacity_table(plain, a.preset, a.e2e_context, a.budget_gib)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
