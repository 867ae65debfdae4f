"""RWKV-7 in the 0.1B shape (12 layers x 768, head 64), random bf16 weights, beside fla 0.6.0.

Three measurements, ours and fla's in the same run (fla's numbers are skipped, with the reason, if
fla cannot be imported or fails), like for like: the backbone (embeddings, blocks, final norm; no LM
head) on both sides, as fla's ``RWKV7Model`` is; ours with the head is printed beside it for the record.

1. prefill of 32 x 2048 tokens (tokens/s);
2. one decode step replayed as a CUDA graph at batch 1 and 32 (ours: the layers on a fixed state, as
   ``forward_reserved`` in the generate loop; fla: RWKV7Model with its cache, captured the same way);
3. the chunked wkv kernel alone at 32 x 2048 with 12 heads of 64 (bf16): our ``chunk_rwkv7`` vs
   fla's ``chunk_rwkv7`` (called as fla's RWKV7Attention calls it). ``--sweep`` also times our kernel
   for every chunk size / BV / num_warps / num_stages (``chunk.DEFAULT_CONFIG`` comes from this).

``--chunk-only`` skips the models and times only the chunk kernel at ``--batch`` x ``--seq`` with 12 heads
of 64 (bf16): our ``chunk_rwkv7`` with each inverse (``inverse="rows"``, the first version, and the
default ``"blocked"``), a few scan configs (``maxnreg`` caps that let three scan programs share an SM),
fla's ``chunk_rwkv7`` if it imports; then the inverse kernel alone per variant and per chunks-per-program,
and the CUDA time per kernel of one call of each variant (torch profiler).

Timings: ``triton.testing.do_bench`` medians. fla's first compile/autotune takes 2 to 4 minutes.

    python benchmarks/bench_rwkv7.py [--batch 32] [--seq 2048] [--out results.json] [--no-fla] [--sweep] [--profile]
    python benchmarks/bench_rwkv7.py --chunk-only [--no-fla] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

import constant_state as cs

FLA_LOWER_BOUND = -0.6065306597126334
TARGETS = {"chunk_kernel": "ours >= fla (39 M tok/s on the H200)", "decode_b1": "ours <= fla (1.28 ms), backbone"}


def bench(fn, rep_ms: int = 200) -> float:
    """Median milliseconds of ``fn``."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def graph_of(fn):
    """Warm ``fn`` up on a side stream, capture it as a CUDA graph; returns replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


# -- ours ------------------------------------------------------------------------------------------

def ours_model():
    return cs.load("rwkv7-0.1b", device="cuda", dtype="bfloat16")


def backbone(model, ids, state):
    """Our forward without the LM head (embeddings, blocks, final norm): what fla's RWKV7Model returns."""
    return model.forward_hidden(ids, state)


def step_fn(model, ids, state, head):
    if head:
        return lambda: model.forward_reserved(ids, state, last_only=True)
    return lambda: backbone(model, ids, state)


@torch.inference_mode()
def ours_prefill(model, b, t, head=False) -> float:
    ids = torch.randint(0, model.config.vocab_size, (b, t), device="cuda")
    state = model.init_state(b)
    return bench(step_fn(model, ids, state, head), rep_ms=500)


@torch.inference_mode()
def ours_decode(model, b, head=False) -> float:
    ids = torch.randint(0, model.config.vocab_size, (b, 1), device="cuda")
    state = model.init_state(b)
    model(torch.randint(0, model.config.vocab_size, (b, 16), device="cuda"), state)
    replay = graph_of(step_fn(model, ids, state, head))
    return bench(replay)


def kernel_inputs(b, t, h=12, d=64):
    r, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w = (FLA_LOWER_BOUND * torch.rand(b, t, h, d, device="cuda")).to(torch.bfloat16)
    kk = torch.nn.functional.normalize(torch.randn(b, t, h, d, device="cuda"), dim=-1)
    a, bb = (-kk).to(torch.bfloat16), (kk * torch.rand_like(kk)).to(torch.bfloat16)
    s0 = torch.zeros(b, h, d, d, device="cuda", dtype=torch.float32)
    return (r, w, k * 0.1, v, a, bb), s0


def ours_chunk(b, t, chunk_size=None, config=None, inverse="blocked") -> float:
    from constant_state.kernels.rwkv7.chunk import CHUNK, chunk_rwkv7

    xs, s0 = kernel_inputs(b, t)
    kw = dict(chunk_size=chunk_size or CHUNK, config=config, inverse=inverse)
    chunk_rwkv7(*xs, s0, inplace=True, **kw)  # compile outside the timing
    return bench(lambda: chunk_rwkv7(*xs, s0, inplace=True, **kw))


def sweep_chunk(b, t) -> list[dict]:
    """Our chunk kernel for every chunk size / BV / num_warps (1 stage), then 2 stages for the best three."""
    out = []

    def one(bt, cfg):
        ms, err = attempt(ours_chunk, b, t, bt, cfg)
        rec = dict(chunk_size=bt, BV=cfg[0], num_warps=cfg[1], num_stages=cfg[2], ms=ms,
                   mtok_s=None if ms is None else b * t / ms / 1e3, error=err)
        out.append(rec)
        print(f"# sweep BT={bt} BV={cfg[0]} warps={cfg[1]} stages={cfg[2]}: "
              + (f"{ms:.3f} ms, {b * t / ms / 1e3:.1f} M tok/s" if ms else f"failed: {err}"), flush=True)

    for bt in (16, 32):
        for bv in (16, 32, 64):
            for nw in (4, 8):
                one(bt, (bv, nw, 1))
    best = sorted((r for r in out if r["ms"]), key=lambda r: r["ms"])[:3]
    for r in best:
        one(r["chunk_size"], (r["BV"], r["num_warps"], 2))
    return out


# -- fla -------------------------------------------------------------------------------------------

def fla_model():
    warnings.filterwarnings("ignore")
    from fla.models import RWKV7Config, RWKV7Model

    cfg = RWKV7Config(hidden_size=768, num_hidden_layers=12, head_dim=64, vocab_size=65536, decay_low_rank_dim=64,
                      a_low_rank_dim=64, v_low_rank_dim=32, gate_low_rank_dim=128)
    with torch.device("cuda"):
        return RWKV7Model(cfg).to(torch.bfloat16).eval()


@torch.inference_mode()
def fla_prefill(model, b, t) -> float:
    ids = torch.randint(0, 65536, (b, t), device="cuda")
    return bench(lambda: model(input_ids=ids, use_cache=False), rep_ms=500)


@torch.inference_mode()
def fla_decode(model, b) -> float:
    ids = torch.randint(0, 65536, (b, 1), device="cuda")
    cache = model(input_ids=torch.randint(0, 65536, (b, 16), device="cuda"), use_cache=True).past_key_values
    replay = graph_of(lambda: model(input_ids=ids, past_key_values=cache, use_cache=True))
    return bench(replay)


def fla_chunk(b, t) -> float:
    from fla.ops.rwkv7 import chunk_rwkv7

    xs, s0 = kernel_inputs(b, t)

    def run():
        return chunk_rwkv7(*xs, scale=1.0, initial_state=s0, output_final_state=True, safe_gate=True,
                           lower_bound=FLA_LOWER_BOUND, chunk_size=64)

    run()
    return bench(run)


def count_kernels(fn) -> int:
    """CUDA kernels (and copies) one eager call of ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@torch.inference_mode()
def launches(model, fla) -> dict:
    out = {}
    ids = torch.randint(0, 65536, (1, 1), device="cuda")
    state = model.init_state(1)
    out["ours"] = count_kernels(lambda: backbone(model, ids, state))
    if fla is not None:
        cache = fla(input_ids=torch.randint(0, 65536, (1, 16), device="cuda"), use_cache=True).past_key_values
        out["fla"] = count_kernels(lambda: fla(input_ids=ids, past_key_values=cache, use_cache=True))
    return out


@torch.inference_mode()
def profile_prefill(model, b, t, top=15) -> list[tuple[str, float]]:
    """CUDA time per kernel name (ms, summed over the 12 layers) of one backbone prefill."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (b, t), device="cuda")
    state = model.init_state(b)
    backbone(model, ids, state)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        backbone(model, ids, state)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"# prefill {b}x{t} kernels, total {total:.1f} ms:", flush=True)
    for name, ms in rows[:top]:
        print(f"#   {ms:8.2f} ms  {name[:110]}", flush=True)
    return rows[:top]


def attempt(fn, *args):
    try:
        return fn(*args), None
    except Exception as e:  # fla missing or failing: report it in the table, keep our numbers
        return None, f"{type(e).__name__}: {str(e)[:120]}"


# -- --chunk-only -------------------------------------------------------------------------------------

def kernel_times(fn, reps=5) -> list[tuple[str, float]]:
    """CUDA ms per call of each kernel ``fn`` launches (torch profiler, mean of ``reps`` calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3 / reps) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def chunk_only(args, out, save) -> None:
    """Only the chunk kernel: ours with each inverse and a few scan configs, fla's; the inverses alone."""
    from constant_state.kernels.rwkv7 import chunk as ck

    b, t, h, d = args.batch, args.seq, 12, 64
    n_tok = b * t
    torch.manual_seed(0)
    xs, s0 = kernel_inputs(b, t, h, d)
    r, w, k, v, a, bb = xs
    default = ck.default_config(r.device, b * h, d)
    variants = [("ours, inverse=rows (first version)", dict(inverse="rows")),
                ("ours, inverse=blocked (default)", dict(inverse="blocked"))]
    for cfg in ((64, 4, 2), (64, 4, 2, 168), (64, 4, 1, 168), (64, 4, 1)):
        if tuple(cfg) != tuple(default):
            variants.append((f"ours, blocked, scan config {cfg}", dict(inverse="blocked", config=cfg)))
    rows = out["chunk_only"] = []

    # Same inputs, same answer: the variants are checked against the first one before timing.
    o_first = None
    for name, kw in variants:
        rec = dict(name=name, **{k_: str(v_) for k_, v_ in kw.items()})
        try:
            s = s0.clone()
            o, _ = ck.chunk_rwkv7(*xs, s, inplace=True, **kw)
            if o_first is None:
                o_first = o
            rec["max_abs_diff_vs_first"] = (o.float() - o_first.float()).abs().max().item()
            s = s0.clone()
            ms = bench(lambda: ck.chunk_rwkv7(*xs, s, inplace=True, **kw))
            rec.update(ms=ms, mtok_s=n_tok / ms / 1e3)
            rec["kernels"] = kernel_times(lambda: ck.chunk_rwkv7(*xs, s, inplace=True, **kw))
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(rec)
        print(f"# {name}: " + (f"{rec['ms']:.3f} ms, {rec['mtok_s']:.1f} M tok/s, max |o - o_first| "
                                f"{rec['max_abs_diff_vs_first']:.2e}" if "ms" in rec else rec["error"]), flush=True)
        save()
    if not args.no_fla:
        rec = dict(name="fla 0.6.0 chunk_rwkv7 (safe_gate, chunk 64)")
        try:
            warnings.filterwarnings("ignore")
            from fla.ops.rwkv7 import chunk_rwkv7 as fla_chunk_rwkv7

            def run():
                return fla_chunk_rwkv7(*xs, scale=1.0, initial_state=s0, output_final_state=True, safe_gate=True,
                                       lower_bound=FLA_LOWER_BOUND, chunk_size=64)

            o_fla = run()[0]
            rec["max_abs_diff_vs_first"] = (o_fla.float() - o_first.float()).abs().max().item() \
                if o_first is not None else None
            ms = bench(run)
            rec.update(ms=ms, mtok_s=n_tok / ms / 1e3, kernels=kernel_times(run))
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(rec)
        print(f"# {rec['name']}: " + (f"{rec['ms']:.3f} ms, {rec['mtok_s']:.1f} M tok/s" if "ms" in rec
                                      else rec["error"]), flush=True)
        save()

    # The inverse kernel alone (the first of the two launches of ours).
    inv_rows = out["inverse_only"] = []
    nt = -(-t // ck.CHUNK)
    auto_nc = ck.inverse_launch(r.device, b * h * nt, ck.CHUNK)[0]
    inv_variants = [("rows", None, 1)] + [("blocked", nc, 1) for nc in (None, 1, 2, 4, 8, 16) if nc != auto_nc]
    inv_variants.append(("blocked", None, 2))
    ref = ck.chunk_inverses(w, a, bb, inverse="rows")
    for inverse, nc, stages in inv_variants:
        label = f"inverse={inverse}" + ("" if inverse == "rows" else f", {nc or auto_nc} chunks/program" + (
            f", {stages} stages" if stages > 1 else " (default)" if nc is None else ""))
        rec = dict(name=label)
        kw = dict(inverse=inverse, chunks_per_program=nc, num_stages=stages)
        try:
            inv = ck.chunk_inverses(w, a, bb, **kw)
            rec["max_abs_diff_vs_rows"] = (inv - ref).abs().max().item()
            ms = bench(lambda: ck.chunk_inverses(w, a, bb, **kw))
            rec.update(ms=ms, mtok_s=n_tok / ms / 1e3)
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        inv_rows.append(rec)
        print(f"# {label}: " + (f"{rec['ms']:.3f} ms, max |inv - rows| {rec['max_abs_diff_vs_rows']:.2e}"
                                if "ms" in rec else rec["error"]), flush=True)
        save()

    print(f"\nchunk kernel alone, {b} x {t}, {h} heads of {d}, bf16, {torch.cuda.get_device_name()}\n")
    print("| variant | ms per call | M tok/s | max abs diff of o vs the first row |")
    print("| --- | --- | --- | --- |")
    for rec in rows:
        if "ms" in rec:
            diff = rec.get("max_abs_diff_vs_first")
            print(f"| {rec['name']} | {rec['ms']:.3f} | {rec['mtok_s']:.1f} | "
                  f"{'n/a' if diff is None else f'{diff:.2e}'} |")
        else:
            print(f"| {rec['name']} | failed: {rec['error']} | | |")
    print("\n| inverse kernel alone | ms per call | max abs diff vs rows |")
    print("| --- | --- | --- |")
    for rec in inv_rows:
        print(f"| {rec['name']} | " + (f"{rec['ms']:.3f} | {rec['max_abs_diff_vs_rows']:.2e} |" if "ms" in rec
                                        else f"failed: {rec['error']} | |"))
    print("\nCUDA time per kernel, one call (torch profiler, mean of 5 calls):")
    for rec in rows:
        for name, ms in rec.get("kernels", [])[:8]:
            print(f"  {rec['name'][:40]:40s} {ms:8.3f} ms  {name[:90]}")
    save()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--no-fla", action="store_true", help="ours only (skips fla's 2-4 minute compile/autotune)")
    ap.add_argument("--sweep", action="store_true", help="also time our chunk kernel for every launch config")
    ap.add_argument("--profile", action="store_true", help="also list our prefill's kernels by CUDA time")
    ap.add_argument("--chunk-only", action="store_true",
                    help="only the chunk kernel: ours with each inverse and a few scan configs, fla's, "
                         "the inverse kernel alone (no models)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_rwkv7.py needs a CUDA device (torch.cuda.is_available() is False): the kernels it "
                 "times are Triton GPU kernels. The CPU checks are the tests (tests/kernels, TRITON_INTERPRET=1).")
    b, t = args.batch, args.seq
    torch.manual_seed(0)
    rows, notes = [], []
    out = {"rows": rows, "notes": notes, "device": torch.cuda.get_device_name()}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=2)

    if args.chunk_only:
        chunk_only(args, out, save)
        return

    model = ours_model()
    fla, err = (None, "--no-fla") if args.no_fla else attempt(fla_model)
    if err:
        notes.append(f"fla RWKV7Model unavailable: {err}")

    def row(name, unit, ours_fn, fla_fn, per, lower_is_better):
        ours_ms, e = attempt(ours_fn)
        if e:
            notes.append(f"ours {name}: {e}")
            print(f"# {name}: ours failed: {e}", flush=True)
            return
        fla_ms, e = attempt(fla_fn) if fla_fn is not None else (None, None)
        if e:
            notes.append(f"fla {name}: {e}")
        conv = (lambda ms: per / ms / 1e3) if unit == "M tok/s" else (lambda ms: ms)
        ours_v, fla_v = conv(ours_ms), (conv(fla_ms) if fla_ms else None)
        ratio = None if fla_v is None else (fla_v / ours_v if lower_is_better else ours_v / fla_v)
        rows.append(dict(name=name, unit=unit, ours=ours_v, fla=fla_v, ours_ms=ours_ms, fla_ms=fla_ms,
                         speedup=ratio))
        print(f"# {name}: ours {ours_v:.3f} {unit}, fla {fla_v if fla_v is None else round(fla_v, 3)}", flush=True)
        save()

    row(f"chunk kernel {b}x{t}, 12 heads x 64, bf16", "M tok/s", lambda: ours_chunk(b, t),
        None if args.no_fla else (lambda: fla_chunk(b, t)), b * t, False)
    row(f"prefill {b}x{t}, backbone", "M tok/s", lambda: ours_prefill(model, b, t),
        (lambda: fla_prefill(fla, b, t)) if fla else None, b * t, False)
    for db in (1, 32):
        row(f"decode step, CUDA graph, batch {db}, backbone", "ms", lambda: ours_decode(model, db),
            (lambda: fla_decode(fla, db)) if fla else None, db, True)
    row(f"prefill {b}x{t}, with LM head (last token)", "M tok/s", lambda: ours_prefill(model, b, t, head=True),
        None, b * t, False)
    for db in (1, 32):
        row(f"decode step, CUDA graph, batch {db}, with LM head", "ms", lambda: ours_decode(model, db, head=True),
            None, db, True)

    out["decode_kernels_b1"], e = attempt(launches, model, fla)
    print(f"# kernels per decode step (batch 1, backbone, eager): {out['decode_kernels_b1'] or e}", flush=True)

    print(f"\nRWKV-7 0.1B shape (12 x 768, head 64), bf16, {torch.cuda.get_device_name()}\n")
    print("| measurement | unit | ours | fla 0.6.0 | ours vs fla (>1: ours faster) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        fla_s = "n/a" if r["fla"] is None else f"{r['fla']:.3f}"
        ratio = "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"| {r['name']} | {r['unit']} | {r['ours']:.3f} | {fla_s} | {ratio} |")
    print("\nBackbone rows: embeddings, blocks, final norm on both sides (fla's RWKV7Model); the 'with LM head'"
          " rows are ours only (65536-way head on the last token).")
    print(f"Targets: {TARGETS}")
    for n in notes:
        print(f"note: {n}")
    save()
    if args.profile:
        out["prefill_profile"], e = attempt(profile_prefill, model, b, t)
        save()
    if args.sweep:
        out["sweep"] = sweep_chunk(b, t)
        save()


if __name__ == "__main__":
    main()
