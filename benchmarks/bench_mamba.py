"""Mamba-1 / Mamba-2 on CUDA beside mamba-ssm's own MambaLMHeadModel, in the same run.

Modes (default: all):
  step     decode step as a CUDA graph at batch 1 and 32 (ours: our forward_reserved captured as the
           generate loop does; mamba-ssm: its model's step through InferenceParams, captured the same way)
  prefill  prefill tokens/s at 32 x 2048 (ours: into a fresh state, and continuing an existing one;
           mamba-ssm: its fused no-cache forward and its cache-filling forward); last-token logits only
  e2e      decode tokens/s at batch 32 after a 32k-token context: Mamba vs a ~124M-parameter bf16
           Llama-style Transformer (paged KV cache), prompt prefilled in chunks then cloned to 32 rows

Random weights in the mamba-130m / mamba2-130m shapes (24 layers, d_model 768), bf16; the same
weights are loaded into mamba-ssm's model. Timings: triton.testing.do_bench medians (L2 flushed),
decode steps are graph replays. Prints markdown tables with ratios (ours / mamba-ssm).

    PYTHONPATH=/tmp/cuda_site:$PWD python benchmarks/bench_mamba.py [--mode step|prefill|e2e|all]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from triton.testing import do_bench

import constant_state as cs
from constant_state.kernels.mamba.backend import kernels_available
from constant_state.models.config import TransformerConfig
from constant_state.models.mamba import to_mamba_ssm

PRESETS = {"mamba1": "mamba-130m", "mamba2": "mamba2-130m"}
TRANSFORMER_130M = TransformerConfig(vocab_size=50280, hidden_size=768, intermediate_size=2048, num_layers=12,
                                     num_heads=12, num_kv_heads=12, tie_word_embeddings=True,
                                     max_position_embeddings=65536, dtype="bfloat16")


def ms(fn, rep: int = 200) -> float:
    """Median milliseconds of ``fn`` over about ``rep`` ms of runs (L2 flushed before each)."""
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def capture(fn, warmup: int = 3):
    """``fn`` captured as a CUDA graph after warm-up runs on a side stream; returns (graph, output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def ours_model(kind):
    return cs.build_model(cs.resolve_config(PRESETS[kind]), device="cuda", dtype="bfloat16", seed=0).eval()


def theirs_model(model):
    from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    cfg, sd = to_mamba_ssm(model)
    m = MambaLMHeadModel(SsmConfig(**cfg), device="cuda", dtype=torch.bfloat16).eval()
    m.load_state_dict(sd)
    return m


@torch.inference_mode()
def bench_step(model, theirs, batch: int, prompt: int = 16) -> dict:
    v = model.config.vocab_size
    ids0 = torch.randint(0, v, (batch, prompt), device="cuda")
    state = model.init_state(batch)
    model(ids0, state, last_only=True)
    ids = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    g, _ = capture(lambda: model.forward_reserved(ids, state, last_only=True))
    row = {"batch": batch, "ours_ms": ms(g.replay)}
    if theirs is not None:
        from mamba_ssm.utils.generation import InferenceParams

        inf = InferenceParams(max_seqlen=prompt + 100000, max_batch_size=batch)
        theirs(ids0, inference_params=inf, num_last_tokens=1)
        inf.seqlen_offset += prompt
        g2, _ = capture(lambda: theirs(ids, inference_params=inf, num_last_tokens=1).logits)
        row["mamba_ssm_ms"] = ms(g2.replay)
        row["ratio"] = row["ours_ms"] / row["mamba_ssm_ms"]
    return row


@torch.inference_mode()
def bench_prefill(model, theirs, batch: int = 32, t: int = 2048) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, t), device="cuda")
    tok = batch * t
    state = model.init_state(batch)

    def fresh():
        state.release()
        model(ids, state, last_only=True)

    cont_state = model.init_state(batch)
    model(ids[:, :16], cont_state, last_only=True)
    row = {"tokens": f"{batch}x{t}", "ours_Mtok_s": tok / ms(fresh, 1500) / 1e3,
           "ours_from_state_Mtok_s": tok / ms(lambda: model(ids, cont_state, last_only=True), 1500) / 1e3}
    if theirs is not None:
        from mamba_ssm.utils.generation import InferenceParams

        def cache_fill():
            theirs(ids, inference_params=InferenceParams(max_seqlen=t, max_batch_size=batch), num_last_tokens=1)

        row["mamba_ssm_fused_Mtok_s"] = tok / ms(lambda: theirs(ids, num_last_tokens=1), 1500) / 1e3
        row["mamba_ssm_cache_fill_Mtok_s"] = tok / ms(cache_fill, 1500) / 1e3
        row["ratio_vs_fused"] = row["ours_Mtok_s"] / row["mamba_ssm_fused_Mtok_s"]
        row["ratio_vs_cache_fill"] = row["ours_Mtok_s"] / row["mamba_ssm_cache_fill_Mtok_s"]
    return row


@torch.inference_mode()
def check_same_model(model, theirs) -> float:
    ids = torch.randint(0, model.config.vocab_size, (2, 200), device="cuda")
    a = model(ids)[0].float()
    b = theirs(ids).logits.float()
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.inference_mode()
def bench_e2e(model, batch: int, context: int, new: int, chunk: int) -> dict:
    """Decode tokens/s of ``batch`` rows that each hold ``context`` tokens (one prompt prefilled
    in chunks, then cloned: physical copies of KV blocks, so memory and traffic are real)."""
    cap = context + new + 8
    blocks = -(-cap // getattr(getattr(model, "kv_config", None), "block_size", 16))
    state1 = model.init_state(1, max_context=cap, num_blocks=(batch + 1) * blocks + 8)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, context, chunk):
        logits, _ = model(ids[:, s:s + chunk], state1, last_only=True)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    state = state1.clone([0] * batch)
    tokens = logits[:, -1].argmax(-1).expand(batch).contiguous()
    step_ids = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    state.reserve(1)
    snap = state.snapshot()
    # One warm-up: it writes KV only into the slot reserved above, and the snapshot undoes the rest.
    g, out = capture(lambda: model.forward_reserved(step_ids, state, last_only=True)[:, -1].argmax(-1), warmup=1)
    state.restore(snap)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(new):
        if i:
            state.reserve(1)
        step_ids.copy_(tokens[:, None])
        g.replay()
        tokens = out
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"context": context, "batch": batch, "new": new, "prefill_1_row_s": prefill_s,
            "decode_tok_s": batch * new / dt, "step_ms": dt / new * 1e3,
            "state_GiB": state.nbytes() / 2 ** 30, "peak_GiB": torch.cuda.max_memory_allocated() / 2 ** 30}


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["step", "prefill", "e2e", "all"], default="all")
    p.add_argument("--kinds", nargs="+", default=["mamba1", "mamba2"], choices=list(PRESETS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--new", type=int, default=64, help="decode steps timed in the e2e mode")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk of the e2e mode")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    avail = kernels_available()
    print(f"kernels importable: {avail}; GPU: {torch.cuda.get_device_name()}")
    have_ssm = all(avail.values())
    results = {}
    for kind in args.kinds:
        model = ours_model(kind)
        theirs = theirs_model(model) if have_ssm else None
        print(f"\n## {kind} ({PRESETS[kind]}, bf16, {model.num_parameters() / 1e6:.0f}M params, "
              f"backend {model.layers[0].mixer.ops('cuda').name})")
        if theirs is not None:
            print(f"max |logit diff| / max |logit| vs mamba-ssm (same weights, bf16): {check_same_model(model, theirs):.2e}")
        if args.mode in ("step", "all"):
            rows = [bench_step(model, theirs, b) for b in args.batches]
            results[f"{kind}_step"] = rows
            print("\nDecode step (CUDA graph replay, target ratio <= 1.05)\n\n" + table(rows))
        if args.mode in ("prefill", "all"):
            rows = [bench_prefill(model, theirs)]
            results[f"{kind}_prefill"] = rows
            print("\nPrefill (target ratio >= 0.95)\n\n" + table(rows))
        del model, theirs
        torch.cuda.empty_cache()
    if args.mode in ("e2e", "all"):
        rows = []
        for name, make in [(PRESETS[k], lambda k=k: ours_model(k)) for k in args.kinds] + [
                ("transformer-124m", lambda: cs.build_model(TRANSFORMER_130M, device="cuda", dtype="bfloat16"))]:
            model = make()
            torch.cuda.reset_peak_memory_stats()
            rows.append({"model": name, "params_M": model.num_parameters() / 1e6,
                         **bench_e2e(model, 32, args.context, args.new, args.chunk)})
            del model
            torch.cuda.empty_cache()
        tr = rows[-1]["decode_tok_s"]
        for r in rows:
            r["x_transformer"] = r["decode_tok_s"] / tr
        results["e2e"] = rows
        print(f"\nEnd-to-end decode at batch 32 after a {args.context}-token context (target Mamba >= 5x)\n\n"
              + table(rows))
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
