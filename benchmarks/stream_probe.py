"""How fast warps can stream the fp8 paged layout of the decode benchmark (batch 32, 32k context, 8 KV
heads, head dim 128, 16-token blocks in random order), loading tiles directly into registers one tile
ahead (as the CUDA decode kernel does) or by TMA into a shared-memory ring of STAGES tiles per warp,
with ``work`` dependent FMAs per tile standing in for the decode arithmetic (csrc/stream_probe.cu).
Rows also load the per-token scales as the kernel does (``+scales``), take blocks head-major
``[N, Hkv, BS, D]`` (``HND``) or make each key load cover whole 32-byte sectors (``sector``).
Bandwidth = key and value code bytes / time (triton.testing.do_bench median, L2 flushed); results in
docs/benchmarks.md (eighth session). H200 only:

    python benchmarks/stream_probe.py [--work 0 100 200] [--stages 3 4] [--order contiguous]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
from pathlib import Path

import torch
import triton.testing

from constant_state.kernels.paged_attention.cuda_decode import _nvcc

SOURCE = Path(__file__).with_name("csrc") / "stream_probe.cu"


class Probe(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_void_p) for n in ("k", "v", "bt", "ks", "vs", "out")]
                + [(n, ctypes.c_int32) for n in ("hkv", "m", "splits", "tiles_per_split", "items", "work", "hnd",
                                                  "sector")])


def build(stages: int, tmp: str) -> ctypes.CDLL:
    lib = Path(tmp) / f"stream_probe_{stages}.so"
    subprocess.run([_nvcc(), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-DSTAGES={stages}",
                    "-gencode=arch=compute_90,code=sm_90", str(SOURCE), "-o", str(lib)], check=True)
    so = ctypes.CDLL(str(lib))
    so.probe_launch.argtypes = [ctypes.POINTER(Probe), ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    so.probe4_launch.argtypes = [ctypes.POINTER(Probe), ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return so


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=50) * 1e3


def int4_chunks(a, libs, stream) -> list[tuple]:
    """int4 (D 128, groups of 64) with each block's codes, scales and zero points of one KV head in one
    2304-byte chunk, two tiles per step: direct loads into registers one step ahead (uncapped, or capped at
    12 / 16 warps per SM by unused shared memory) beside cp.async.bulk copies into a ring of STAGES steps."""
    b, hkv, ctx, bs, c4 = 32, 8, 32768, 16, 2304
    m = ctx // bs
    n = b * m
    buf = torch.randint(0, 256, (n * hkv * c4,), dtype=torch.uint8, device="cuda")
    bt = (torch.randperm(n, device="cuda") if a.order == "random" else torch.arange(n, device="cuda")).int().view(b, m)
    tps = -(-m // a.splits)
    items = b * hkv * a.splits
    out = torch.empty(items * 32, dtype=torch.int32, device="cuda")
    lib0 = libs[a.stages[0]]
    variants = ([("int4 chunks, direct", lib0, 0, 0), ("int4 chunks, direct, 12 warps/SM", lib0, 0, 72 * 1024),
                 ("int4 chunks, direct, 16 warps/SM", lib0, 0, 54 * 1024)]
                + [(f"int4 chunks, bulk ring {s}", libs[s], 1, 0) for s in a.stages])
    rows = []
    for work in a.work:
        for name, lib, mode, smem in variants:
            p = Probe(buf.data_ptr(), 0, bt.data_ptr(), 0, 0, out.data_ptr(), hkv, m, a.splits, tps, items, work, 0, 0)

            def launch(lib=lib, mode=mode, p=p, smem=smem):
                if lib.probe4_launch(ctypes.byref(p), mode, smem, stream):
                    raise RuntimeError("probe launch failed")
            us = bench(launch)
            rows.append((name, work, us, buf.numel() / us / 1e6))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=int, nargs="+", default=[0, 100, 200, 300])
    ap.add_argument("--stages", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--splits", type=int, default=6)
    ap.add_argument("--order", choices=["random", "contiguous"], default="random", help="block table order")
    ap.add_argument("--int4", action="store_true", help="the int4 chunk probes (probe4_*) instead of fp8's")
    a = ap.parse_args()
    if a.int4:
        stream = torch.cuda.current_stream().cuda_stream
        with tempfile.TemporaryDirectory() as tmp:
            rows = int4_chunks(a, {s: build(s, tmp) for s in a.stages}, stream)
        print("| load | work (FMA per step) | us | TB/s |\n|---|---|---|---|")
        for name, work, us, tbs in rows:
            print(f"| {name} | {work} | {us:.0f} | {tbs:.2f} |")
        return
    b, hkv, ctx, bs = 32, 8, 32768, 16
    m = ctx // bs
    n = b * m
    k = torch.randint(0, 256, (n, bs, hkv, 128), dtype=torch.uint8, device="cuda")
    v = torch.randint(0, 256, (n, bs, hkv, 128), dtype=torch.uint8, device="cuda")
    bt = (torch.randperm(n, device="cuda") if a.order == "random" else torch.arange(n, device="cuda")).int().view(b, m)
    ks = torch.rand(n, bs, hkv, device="cuda").half()
    vs = torch.rand_like(ks)
    tps = -(-m // a.splits)
    items = b * hkv * a.splits
    out = torch.empty(items * 32, dtype=torch.int32, device="cuda")
    nbytes = 2 * k.numel()  # codes only (the scales add 1.6%)
    stream = torch.cuda.current_stream().cuda_stream
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        libs = {s: build(s, tmp) for s in a.stages}
        lib0 = libs[a.stages[0]]
        variants = ([("direct", lib0, 0, 0, 0), ("direct sector", lib0, 0, 0, 1), ("direct HND", lib0, 0, 1, 0),
                     ("direct HND sector", lib0, 0, 1, 1), ("direct+scales", lib0, 2, 0, 0),
                     ("direct+scales sector", lib0, 2, 0, 1), ("direct+scales HND sector", lib0, 2, 1, 1),
                     ("direct+scales/shfl", lib0, 3, 0, 0)]
                    + [(f"tma{s}", libs[s], 1, 0, 0) for s in a.stages])  # (name, library, mode, hnd, sector)
        for work in a.work:
            for name, lib, mode, hnd, sector in variants:
                p = Probe(k.data_ptr(), v.data_ptr(), bt.data_ptr(), ks.data_ptr(), vs.data_ptr(), out.data_ptr(),
                          hkv, m, a.splits, tps, items, work, hnd, sector)

                def launch(lib=lib, mode=mode, p=p):
                    if lib.probe_launch(ctypes.byref(p), mode, n, stream):
                        raise RuntimeError("probe launch failed")
                us = triton.testing.do_bench(launch, warmup=5, rep=50) * 1e3
                rows.append((name, work, us, nbytes / us / 1e6))
    print("| load | work (FMA per tile) | us | TB/s |\n|---|---|---|---|")
    for name, work, us, tbs in rows:
        print(f"| {name} | {work} | {us:.0f} | {tbs:.2f} |")


if __name__ == "__main__":
    main()
