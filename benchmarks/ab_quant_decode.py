"""A/B of the quantized decode kernel's variants at one shape, in one run (H200 method as
bench_kv_decode.py: CUDA-graph replays, median, the L2 emptied before each by reads; ``--flush write``:
by writes, as triton.testing.do_bench and this script before the twentieth session).

Each argument is a format followed by ``:``-separated switches:

- ``vt`` / ``tm``: value codes token-contiguous within a block / token-major (default: the format's
  storage, ``cache/quant.py``);
- ``kt``: codes and per-token scales token-major, contiguous ``[N, BS, Hkv, ...]`` (the storage is
  head-major since the ninth session, ``ref.head_major``; the Triton kernel takes either by strides,
  the CUDA kernel is compiled for head-major blocks, so ``kt`` runs on Triton);
- ``nooff``: no code offsets kept in the fp16 products; ``voff``: the format's values keep them
  (``decode_quant.OFFSET_KEYS / OFFSET_VALUES``);
- ``noptx``: no inline-PTX decoding of packed codes (``decode_quant.ASM_FORMATS``);
- ``bsN``: blocks of N tokens (default: bench_kv_decode.block_size);
- ``sN``: N splits over the context (default: the launch heuristic);
- ``cuda`` / ``triton``: the quantized decode backend (``decode.DECODE_BACKEND``; default: the
  ``CONSTANT_STATE_DECODE`` setting, ``auto`` if unset): the CUDA warp-per-split kernel of
  ``cuda_decode`` (fp8, int8, int4, kivi2) or the Triton one;
- ``st``: the CUDA kernel's variant that stages tiles through shared memory by cp.async
  (``cuda_decode.STAGED``; its depth ``CONSTANT_STATE_DECODE_STAGES`` is compiled in: one per run);
- ``np``: the one-tile loop where the paired one would serve (``cuda_decode.PAIRED`` off; with at most
  4 query heads per KV head, int4 with groups of 64 and kivi2 put two tiles in one score fragment by
  default);
- ``chunk``: each block's codes, scales and zero points of one KV head side by side in one chunk
  (``ref.head_chunks``; default: the format's storage, ``cache/quant.py``, which chunks int4 with groups
  of 64 in 16-token blocks and kivi2 in 32-token blocks, and keeps one tensor per part otherwise);
- ``nobulk``: the paired loops (int4, kivi2) load into registers where bulk copies of chunks would feed
  them (``cuda_decode.BULK`` off);
- ``seqbt``: each row's blocks consecutive in the pool (default: a random permutation, as
  bench_kv_decode.py);
- ``cu=PATH``: the CUDA kernel built from another copy of ``csrc/paged_decode.cu`` (a variant under
  test), in the same process, so it reads the same cache as the other variants;
- ``nomem``: the CUDA kernel built with ``CS_COMPUTE_ONLY`` (and no L2 look-ahead): its loads of codes
  and per-token scales return words made from their addresses, so the time is its arithmetic's
  (block tables, kivi2's per-block key scales and residual window are still read; output meaningless);
- ``loads``: the CUDA kernel built with ``CS_LOADS_ONLY`` (int4's paired loop): its loads of codes and
  scales as it issues them, each word only xor'ed in before its reload, no arithmetic (72 registers,
  so 28 warps per SM instead of 12): a floor for the time of its load pattern (output meaningless);
- ``BLOCK_N,warps,stages[,maxnreg]``: a tile config.

``sdpa`` alone is the baseline of the same run: ``scaled_dot_product_attention`` on a contiguous bf16 cache.

    python benchmarks/ab_quant_decode.py int4 int4:nooff int4:noptx kivi2:tm fp8:128,4,2,168
"""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path

import bench_kv_decode
import torch
from bench_kv_decode import (D, HKV, HQ, backend_of, bench_graph, block_size, print_rows, random_storage,
                             sdpa_case)

from constant_state.cache.formats import get_format
from constant_state.kernels.paged_attention import cuda_decode, decode_quant
from constant_state.kernels.paged_attention.decode import paged_attention
from constant_state.kernels.paged_attention.ref import as_head_chunks, as_token_major, token_contiguous


def run_sdpa(batch: int, ctx: int, q: torch.Tensor) -> dict:
    call, nbytes = sdpa_case(q, ctx)
    us = bench_graph(call)
    return dict(variant="sdpa", batch=batch, context=ctx, us=us, tb_s=nbytes / us / 1e6)


# Caches by (format, block size, layout switches): variants that differ only in how the kernel runs read
# the very same tensors (the same data and the same physical pages; separate allocations of one format
# measured up to 5% apart on the H200, kivi2 at 32 x 128k: 1732 to 1821 us for one variant).
_CACHES: dict[tuple, tuple] = {}


def cached_storage(fmt: str, bs: int, batch: int, ctx: int, layout: tuple[str, ...], device) -> tuple:
    key = (fmt, bs, batch, ctx, layout)
    if key not in _CACHES:
        m = ctx // bs
        torch.manual_seed(0)
        st, extra = random_storage(fmt, batch * m, batch, bs)
        order = torch.arange(batch * m, device=device) if "seqbt" in layout else torch.randperm(batch * m, device=device)
        bt = order.int().view(batch, m)
        v = st.cache.v
        if "vt" in layout or "tm" in layout:
            nv = (token_contiguous(*v.shape, v.dtype, v.device) if "vt" in layout
                  else torch.empty(v.shape, dtype=v.dtype, device=v.device))
            st.cache.v = nv.copy_(v)
        if "kt" in layout:
            as_token_major(st.cache)
        if "chunk" in layout:
            as_head_chunks(st.cache)
        _CACHES[key] = (st, extra, bt)
    return _CACHES[key]


@contextlib.contextmanager
def kernel_source(path: str | None, defines: tuple[str, ...] = ()):
    """The CUDA kernel built from ``path`` (a copy of csrc/paged_decode.cu; None: the source itself) with
    the extra macros ``defines`` (``cuda_decode.DEFINES``) inside the block; neither: as is."""
    if path is None and not defines:
        yield
        return
    saved = cuda_decode.SOURCE, cuda_decode.DEFINES

    def use(source: Path, macros: tuple[str, ...]) -> None:
        cuda_decode.SOURCE, cuda_decode.DEFINES = source, macros
        cuda_decode._library.cache_clear()  # the library and its occupancy are per build
        cuda_decode.warp_slots.cache_clear()

    use(Path(path).resolve() if path else saved[0], defines)
    try:
        yield
    finally:
        use(*saved)


# The compute-only diagnostic build (``nomem``): loads replaced by address-made words, no L2 look-ahead.
COMPUTE_ONLY = ("CS_COMPUTE_ONLY", "CS_L2_AHEAD=0")
# The loads-only diagnostic build (``loads``): the arithmetic dropped, the loads kept.
LOADS_ONLY = ("CS_LOADS_ONLY",)


def run_variant(spec: str, batch: int, ctx: int, q: torch.Tensor, seq: torch.Tensor) -> dict:
    if spec == "sdpa":
        return run_sdpa(batch, ctx, q)
    fmt, *switches = spec.split(":")
    if "loads" in switches and (fmt != "int4" or {"np", "st", "triton"} & set(switches)):
        raise SystemExit(f"{spec}: `loads` times int4's paired CUDA loop only (no np, st or triton)")
    sizes = [int(s[2:]) for s in switches if s.startswith("bs")]
    bs = sizes[0] if sizes else block_size(fmt)
    m = ctx // bs
    layout = tuple(sorted(s for s in switches if s in ("vt", "tm", "kt", "seqbt", "chunk")))
    st, extra, bt = cached_storage(fmt, bs, batch, ctx, layout, q.device)
    kind = st.cache.kind
    saved = (decode_quant.OFFSET_KEYS, decode_quant.OFFSET_VALUES, decode_quant.ASM_FORMATS, cuda_decode.STAGED,
             cuda_decode.PAIRED, cuda_decode.BULK)
    source = next((s[3:] for s in switches if s.startswith("cu=")), None)
    defines = COMPUTE_ONLY if "nomem" in switches else LOADS_ONLY if "loads" in switches else ()
    backend = next((s for s in switches if s in ("cuda", "triton")), "")
    if "nooff" in switches:
        decode_quant.OFFSET_KEYS, decode_quant.OFFSET_VALUES = set(), set()
    if "voff" in switches:
        decode_quant.OFFSET_VALUES = decode_quant.OFFSET_VALUES | {kind}
    if "noptx" in switches:
        decode_quant.ASM_FORMATS = {}
    cuda_decode.STAGED = int("st" in switches)
    cuda_decode.PAIRED = int("np" not in switches)
    cuda_decode.BULK = int("nobulk" not in switches)
    cfgs = [s for s in switches if "," in s]
    cfg = tuple(int(x) for x in cfgs[0].split(",")) if cfgs else None
    splits = [int(s[1:]) for s in switches if re.fullmatch(r"s\d+", s)]
    if splits:
        extra = dict(extra, num_splits=splits[0])
    try:
        with backend_of(f"{fmt}:{backend}"), kernel_source(source, defines):
            us = bench_graph(lambda: paged_attention(q, st.cache, bt, seq, D ** -0.5, config=cfg, **extra))
    finally:
        (decode_quant.OFFSET_KEYS, decode_quant.OFFSET_VALUES, decode_quant.ASM_FORMATS, cuda_decode.STAGED,
         cuda_decode.PAIRED, cuda_decode.BULK) = saved
    nbytes = batch * m * get_format(fmt).page_bytes(bs, HKV, D)
    return dict(variant=spec, batch=batch, context=ctx, us=us, tb_s=nbytes / us / 1e6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--smoke", action="store_true", help="CPU check (set TRITON_INTERPRET=1): batch 1, context 64")
    p.add_argument("--flush", choices=bench_kv_decode.FLUSHES, default="read",
                   help="how the L2 is emptied before each timed replay (bench_kv_decode.FLUSH)")
    a = p.parse_args()
    bench_kv_decode.FLUSH = a.flush
    dev = "cuda"
    if a.smoke:
        dev = bench_kv_decode.DEVICE = "cpu"
        a.batch, a.context = 1, 64
    q = torch.randn(a.batch, 1, HQ, D, device=dev, dtype=torch.bfloat16)
    seq = torch.full((a.batch,), a.context, dtype=torch.int32, device=dev)
    rows = []
    for spec in a.variants:
        rows.append(run_variant(spec, a.batch, a.context, q, seq))
        if dev == "cuda":
            torch.cuda.empty_cache()
    print_rows(rows, ["variant", "batch", "context", "us", "tb_s"])


if __name__ == "__main__":
    main()
