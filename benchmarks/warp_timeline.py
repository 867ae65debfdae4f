"""Where a launch of the CUDA decode kernel spends its time, warp by warp (H200 diagnostic).

Builds ``csrc/paged_decode.cu`` with ``-DCS_TIMELINE``: each warp records its work item's start and end
(``%globaltimer``) and SM. One launch per shape after warm-up (L2 flushed before it), then a table of
the launch span against the same launch's CUDA-graph time (``bench_graph``; with the split merge and
without it, the output then unmerged), when
the warps start (the launch ramp), how long each runs, and when they end (the tail: the last warp
against the median one), plus the split merge timed alone.

    python benchmarks/warp_timeline.py fp8 int8 int4 --shapes 8x32768,32x32768
"""

from __future__ import annotations

import argparse
import ctypes

import torch
from ab_quant_decode import cached_storage, kernel_source
from bench_kv_decode import D, HQ, bench_graph, block_size, print_rows

from constant_state.kernels.paged_attention import cuda_decode, decode
from constant_state.kernels.paged_attention.decode import paged_attention


def timeline_library(arch: str) -> ctypes.CDLL:
    """The CS_TIMELINE build, which every launch then goes through (inside ``kernel_source``)."""
    lib = cuda_decode._library(arch)
    lib.cs_timeline_read.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


LAUNCH: dict = {}
_params = cuda_decode._params


def recording_params(*args, **kw):
    p, out, part, ml, splits = _params(*args, **kw)
    LAUNCH.update(items=p.items, splits=splits)
    return p, out, part, ml, splits


def pct(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q))


def probe(fmt: str, batch: int, ctx: int, lib: ctypes.CDLL) -> dict:
    dev = torch.device("cuda")
    q = torch.randn(batch, 1, HQ, D, device=dev, dtype=torch.bfloat16)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    st, extra, bt = cached_storage(fmt, block_size(fmt), batch, ctx, (), dev)
    run = lambda: paged_attention(q, st.cache, bt, seq, D ** -0.5, **extra)  # noqa: E731
    graph_us = bench_graph(run)
    saved = decode._merge_splits
    decode._merge_splits = lambda *a: None  # the decode launch alone (its output unmerged)
    try:
        nomerge_us = bench_graph(run)
    finally:
        decode._merge_splits = saved
    flush = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
    for _ in range(3):
        flush.zero_()
        run()
    torch.cuda.synchronize()
    items, splits = LAUNCH["items"], LAUNCH["splits"]  # of the last launch (cuda_decode._params)
    buf = torch.zeros(items, 3, dtype=torch.int64)
    err = lib.cs_timeline_read(buf.data_ptr(), items)
    if err:
        raise RuntimeError(f"cs_timeline_read: CUDA error {err}")
    t0 = buf[:, 0].min()
    start, end = (buf[:, 0] - t0).double() / 1e3, (buf[:, 1] - t0).double() / 1e3  # us
    dur = end - start
    # Merge alone: the same partials, graph-replayed.
    merge_us = float("nan")
    if splits > 1:
        part = torch.randn(batch * HQ * splits, D, device=dev)
        ml = torch.rand(batch * HQ * splits, 2, device=dev)
        out = torch.empty(batch, 1, HQ, D, device=dev, dtype=torch.bfloat16)
        merge_us = bench_graph(lambda: decode._merge_splits(part, ml, out, batch * HQ, splits))
    return dict(format=fmt, batch=batch, context=ctx, splits=splits, graph_us=graph_us, no_merge_us=nomerge_us,
                span_us=float(end.max()), start_p99=pct(start, 0.99), start_max=float(start.max()),
                run_min=float(dur.min()), run_p50=pct(dur, 0.5), run_max=float(dur.max()),
                end_p10=pct(end, 0.1), end_p50=pct(end, 0.5), end_max=float(end.max()),
                sms=int(buf[:, 2].unique().numel()), merge_us=merge_us)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("formats", nargs="+", help="fp8, int8, int4, int4-g32, kivi2")
    p.add_argument("--shapes", default="8x32768,32x32768", help="batch x context, comma-separated")
    a = p.parse_args()
    dev = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(dev)
    cuda_decode._params = recording_params
    decode.DECODE_BACKEND = "cuda"
    rows = []
    with kernel_source(None, ("CS_TIMELINE",)):  # every launch (and the occupancy query) through it
        lib = timeline_library(f"{major}{minor}")
        for shape in a.shapes.split(","):
            batch, ctx = (int(x) for x in shape.split("x"))
            for fmt in a.formats:
                rows.append(probe(fmt, batch, ctx, lib))
                torch.cuda.empty_cache()
    print_rows(rows, list(rows[0]))
    x = torch.zeros(1, device=dev)
    print(f"\nA graph of one tiny kernel (x.add_(1)): {bench_graph(lambda: x.add_(1)):.1f} us")


if __name__ == "__main__":
    main()
