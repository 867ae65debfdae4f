"""Attention error of each KV format against fp32 on Llama-like keys and values (CPU, the references).

Keys are drawn before RoPE with a mean and a scale per channel (log-normal scales, a few rotary pairs
8x larger: the per-channel outliers KIVI and KVQuant describe), then rotated at their positions with
Llama-3's RoPE (theta 500000), as the cache holds them (docs/kv_cache.md, "Positions"). Values are
normal with a scale per token. Each format's storage is written as a prefill writes it
(``KVStorage.write`` of the whole context; kivi2 quantizes whole groups of its residual window into
blocks and keeps the rest in fp16), read back dequantized (``ref.dequantize_ref``, kivi2's newest
tokens from the window), and attended in fp32.

Two kinds of query per KV head and query head (GQA 4):

- ``diffuse``: a random query (attention spread over the context);
- ``retrieval``: a needle planted in one earlier key (outside kivi2's fp16 window): a random direction
  added to it, which the query looks for, scaled so that fp32 attention gives the needle half of the
  probability mass.

Columns: the error of the attention output ``|o - o_fp32|`` (RMS over query heads and rows) in units
of a value vector's RMS norm, for both kinds, and the needle's mean probability (0.50 in fp32) with
its worst case.

    python benchmarks/kv_accuracy.py                      # every format, kivi2 at blocks of 16, 32, 64
    python benchmarks/kv_accuracy.py --context 8192 --formats kivi2 --block-sizes 32,64
"""

from __future__ import annotations

import argparse

import torch

from constant_state.cache.formats import get_format
from constant_state.cache.quant import kivi_name
from constant_state.kernels.paged_attention.ref import _with_residual, dequantize_ref, gather_paged

GQA = 4
THETA = 500000.0


def llama_like(n: int, h: int, d: int, gen: torch.Generator, outliers: int = 4):
    """Keys ``[n, h, d]`` after RoPE at positions 0 .. n - 1, and values."""
    mu = torch.randn(h, d, generator=gen)
    sig = torch.exp(0.5 * torch.randn(h, d, generator=gen))
    boost = torch.ones(h, d)
    pairs = torch.randperm(d // 2, generator=gen)[:outliers]
    boost[:, pairs] = boost[:, pairs + d // 2] = 8.0  # rotate_half pairs (i, i + d/2)
    pre = (mu + sig * torch.randn(n, h, d, generator=gen)) * boost
    inv = THETA ** (-torch.arange(0, d, 2).float() / d)
    ang = torch.arange(n).float()[:, None] * inv[None]
    cos, sin = ang.cos().repeat(1, 2)[:, None], ang.sin().repeat(1, 2)[:, None]
    rope = lambda x: x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin  # noqa: E731
    v = torch.randn(n, h, d, generator=gen) * torch.exp(0.3 * torch.randn(n, h, 1, generator=gen))
    return rope(pre), v


def stored_rows(fmt_name: str, bs: int, k: torch.Tensor, v: torch.Tensor):
    """``k, v [B, n, H, D]`` written through the format's storage and read back dequantized (fp32)."""
    b, n, h, d = k.shape
    fmt = get_format(fmt_name)
    m = -(-n // bs)
    st = fmt.make_storage(b * m, bs, h, d, "cpu")
    bt = torch.arange(b * m, dtype=torch.int32).view(b, m)
    seq = torch.full((b,), n, dtype=torch.int32)
    slots = (bt.long()[:, :, None] * bs + torch.arange(bs)).view(b, -1)[:, :n]
    if getattr(fmt, "kind", None) == "kivi2":
        rows = fmt.row_tensors(b, h, d, "cpu")
        for i in range(b):
            st.write(k[i:i + 1], v[i:i + 1], slots[i:i + 1], seq_lens=seq[i:i + 1], block_tables=bt[i:i + 1],
                     res_k=rows["res_k"][i:i + 1], res_v=rows["res_v"][i:i + 1])
        kd, vd = dequantize_ref(st.cache)
        kg, vg, _ = _with_residual(kd, vd, bt, seq, rows["res_k"], rows["res_v"], st.cache.residual)
    else:
        st.write(k, v, slots)
        if hasattr(st, "cache"):
            kd, vd = dequantize_ref(st.cache)
        else:
            kd, vd = st.k.float(), st.v.float()
        kg, vg = gather_paged(kd, bt), gather_paged(vd, bt)
    return kg[:, :n], vg[:, :n]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """fp32 attention of ``q [B, Hq, D]`` over ``k, v [B, n, H, D]``: outputs ``[B, Hq, D]`` and
    probabilities ``[B, Hq, n]``."""
    kk = k.repeat_interleave(GQA, dim=2)
    vv = v.repeat_interleave(GQA, dim=2)
    p = torch.einsum("bhd,bnhd->bhn", q, kk).softmax(-1)
    return torch.einsum("bhn,bnhd->bhd", p, vv), p


def queries(k: torch.Tensor, residual: int, gen: torch.Generator, spread: float = 2.0, lift: float = 10.0):
    """(diffuse queries, retrieval queries, needle positions) ``[B, Hq, D]`` x 2, ``[B, Hq]``; queries
    carry the softmax scale. Diffuse: random directions, scaled so that the logits' standard deviation
    over the context is ``spread``. Retrieval: each query head plants a needle in ``k`` (in place): one
    earlier key plus a random direction u times ``lift`` standard deviations of the keys' projections
    on u (distinct content, as a needle's key is); the query is u, scaled so that the needle takes half
    of the probability mass in fp32 (bisection on the log scale)."""
    b, n, h, d = k.shape
    hq = h * GQA
    heads = torch.arange(hq) // GQA
    u = torch.randn(b, hq, d, generator=gen)
    diffuse = u * (spread / torch.einsum("bhd,bnhd->bhn", u, k[:, :, heads]).std(-1, keepdim=True))
    u = torch.randn(b, hq, d, generator=gen)
    u = u / u.norm(dim=-1, keepdim=True)
    pos = torch.randperm(max(hq, n - residual), generator=gen)[:b * hq].view(b, hq) % (n - residual)
    sd = torch.einsum("bhd,bnhd->bhn", u, k[:, :, heads]).std(-1)  # [B, Hq]
    for i in range(b):
        for j in range(hq):
            k[i, pos[i, j], heads[j]] += lift * sd[i, j] * u[i, j]
    lo, hi = torch.full((b, hq, 1), -10.0), torch.full((b, hq, 1), 10.0)
    for _ in range(50):
        mid = (lo + hi) / 2
        _, p = attend(u * mid.exp(), k, k)
        below = p.gather(-1, pos[..., None]) < 0.5
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return diffuse, u * ((lo + hi) / 2).exp(), pos


def err(o: torch.Tensor, ref: torch.Tensor, unit: float) -> float:
    """RMS over rows and query heads of ``|o - ref|``, in units of ``unit``."""
    return (o - ref).norm(dim=-1).pow(2).mean().sqrt().item() / unit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=4096 + 77, help="tokens per row (default 4173)")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--formats", default="bf16,fp8,int8,int4,int4-g32,kivi2")
    ap.add_argument("--block-sizes", default="16,32,64", help="kivi2's block sizes (its key groups); others: 16")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(a.seed)
    n, b, h, d = a.context, a.rows, a.kv_heads, a.head_dim
    k, v = (torch.stack(x) for x in zip(*[llama_like(n, h, d, gen) for _ in range(b)]))
    residual = 128
    qd, qr, pos = queries(k, residual, gen)
    vrms = v.pow(2).sum(-1).mean().sqrt().item()
    od, _ = attend(qd, k, v)
    orr, _ = attend(qr, k, v)
    _, p = attend(qr, k, v)
    mass = p.gather(-1, pos[..., None])
    rows = [("fp32", 4 * 2 * d, 0.0, 0.0, mass.mean().item(), mass.min().item())]
    for name in a.formats.split(","):
        sizes = [int(x) for x in a.block_sizes.split(",")] if name.startswith("kivi2") else [16]
        for bs in sizes:
            fmt = kivi_name() if name == "kivi2" else name
            kq, vq = stored_rows(fmt, bs, k, v)
            o1, _ = attend(qd, kq, vq)
            o2, p2 = attend(qr, kq, vq)
            mass = p2.gather(-1, pos[..., None])
            bytes_per = get_format(fmt).page_bytes(bs, 1, d) / bs
            rows.append((name if not name.startswith("kivi2") else f"kivi2 (bs {bs})", bytes_per, err(o1, od, vrms),
                         err(o2, orr, vrms), mass.mean().item(), mass.min().item()))
    print(f"context {n}, {b} rows, {h} KV heads x GQA {GQA}, head dim {d}, seed {a.seed}")
    print("| format | bytes/token/head | diffuse error | retrieval error | needle mass (fp32 0.50) | worst |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.3f} | {r[5]:.3f} |")


if __name__ == "__main__":
    main()
