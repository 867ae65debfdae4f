"""What the L2 flush before each timed call costs the timed kernel (H200; docs/benchmarks.md,
twentieth session, item 5).

``triton.testing.do_bench`` empties the L2 by zeroing a 256 MB buffer, which leaves the L2 full of
dirty lines: the timed kernel's reads evict them, and their write-backs fall inside its time. This
times SDPA and the paged decode of each format (``bench_kv_decode.bench_graph``: CUDA-graph replays,
CUDA events, median) with the L2 emptied by writes, by reads (clean lines), by both, and not at all
(``bench_kv_decode.FLUSHES``), at batch 8 / 32k, 32 / 32k and 8 / 128k.

    python benchmarks/flush_probe.py [--formats fp8,int4] [--shapes 8x32768,32x32768]
"""

from __future__ import annotations

import argparse

import bench_kv_decode
import torch
from bench_kv_decode import D, HQ, bench_graph, block_size, random_storage, sdpa_case

from constant_state.kernels.paged_attention.decode import paged_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="fp8,int8,int4,kivi2,kivi2@64")
    ap.add_argument("--shapes", default="8x32768,32x32768,8x131072", help="batch x context, comma-separated")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("flush_probe.py needs a CUDA device")

    def each_flush(fn):
        out = {}
        for mode in bench_kv_decode.FLUSHES:
            bench_kv_decode.FLUSH = mode
            out[mode] = bench_graph(fn)
        bench_kv_decode.FLUSH = "read"
        return out

    print("| kernel | batch / context | " + " | ".join(f"L2 by {m} (us)" for m in bench_kv_decode.FLUSHES) + " |")
    print("| --- | --- |" + " --- |" * len(bench_kv_decode.FLUSHES))
    for shape in a.shapes.split(","):
        b, ctx = (int(x) for x in shape.split("x"))
        q = torch.randn(b, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
        seq = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        sdpa, _ = sdpa_case(q, ctx)
        rows = {"SDPA": each_flush(sdpa)}
        del sdpa
        torch.cuda.empty_cache()
        for fmt in a.formats.split(","):
            m = ctx // block_size(fmt)
            st, extra = random_storage(fmt, b * m, b)
            bt = torch.randperm(b * m, device="cuda").int().view(b, m)
            cache = st.cache if hasattr(st, "cache") else (st.k, st.v)
            rows[fmt] = each_flush(lambda: paged_attention(q, cache, bt, seq, D ** -0.5, **extra))
            del st, cache
            torch.cuda.empty_cache()
        for name, r in rows.items():
            print(f"| {name} | {b} / {ctx // 1024}k | " + " | ".join(f"{r[m]:.1f}" for m in bench_kv_decode.FLUSHES)
                  + " |")


if __name__ == "__main__":
    main()
