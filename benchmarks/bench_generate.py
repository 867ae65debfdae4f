"""End-to-end generation: our loop (CUDA-graph decode on a paged KV cache) beside transformers' generate.

Same random Llama-shaped weights in both, same prompts, greedy, fixed number of new tokens.
Prints a markdown table: decode tokens/s (steady state, per-step timestamps), end-to-end
tokens/s, peak GPU memory. Run on a CUDA machine:

    python benchmarks/bench_generate.py --preset llama-3.2-1b --batch 32 --prompt-len 128 --new 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import constant_state as cs
from constant_state.models.config import PRESETS


class _Stamps:
    """Records a timestamp per generated step (the loops sync on each step's tokens anyway)."""

    def __init__(self):
        self.t: list[float] = []

    # our on_tokens callback
    def __call__(self, step, tokens):
        torch.cuda.synchronize()
        self.t.append(time.perf_counter())

    # transformers' streamer protocol
    def put(self, value):
        torch.cuda.synchronize()
        self.t.append(time.perf_counter())

    def end(self):
        pass


def summarize(name: str, stamps: list[float], t0: float, batch: int, new: int, peak: int) -> dict:
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    steady = steps[2:] if len(steps) > 4 else steps  # skip graph capture / first-step warm-up
    step_ms = statistics.median(steady) * 1e3
    return {
        "impl": name,
        "prefill_ms": (stamps[0] - t0) * 1e3,
        "decode_step_ms": step_ms,
        "decode_tok_s": batch / (step_ms / 1e3),
        "e2e_tok_s": batch * new / (stamps[-1] - t0),
        "peak_mem_gib": peak / 2 ** 30,
    }


def run_ours(model, prompts, new, cuda_graph=True):
    stamps = _Stamps()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = model.generate(prompts, max_new_tokens=new, on_tokens=stamps, cuda_graph=cuda_graph)
    torch.cuda.synchronize()
    return out, stamps.t, t0, torch.cuda.max_memory_allocated()


def run_hf(hf, ids, new, cache_implementation=None):
    stamps = _Stamps()
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, streamer=stamps)
    if cache_implementation:
        kw["cache_implementation"] = cache_implementation
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    torch.cuda.synchronize()
    # The streamer's first put() is the prompt itself; the next one is the first new token.
    return out, stamps.t[1:], t0, torch.cuda.max_memory_allocated()


def to_hf(model, cfg, device="cuda"):
    """transformers' LlamaForCausalLM holding exactly our weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                         rope_scaling=cfg.rope_scaling, max_position_embeddings=cfg.max_position_embeddings,
                         tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device(device):
        hf = LlamaForCausalLM._from_config(hf_cfg, dtype=model.dtype)
    sd = {(k if k == "lm_head.weight" else "model." + k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise RuntimeError(f"weight transfer to transformers failed: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--kv", default="auto")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")

    cfg = PRESETS[args.preset]
    model = cs.load(args.preset, device="cuda", dtype="bfloat16", kv=args.kv)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=g)
    prompts = ids.tolist()
    results = []
    run_ours(model, prompts, 8)  # warm-up (kernels, allocator)
    out, st, t0, peak = run_ours(model, prompts, args.new)
    results.append(summarize(f"constant_state paged {model.state_specs()[0].kv_format}, CUDA graph",
                             st, t0, args.batch, args.new, peak))
    out_eager, st, t0, peak = run_ours(model, prompts, min(args.new, 64), cuda_graph=False)
    results.append(summarize("constant_state eager", st, t0, args.batch, min(args.new, 64), peak))
    agree = None
    if not args.skip_hf:
        hf = to_hf(model, cfg)
        del model
        torch.cuda.empty_cache()
        dev_ids = ids.cuda()
        run_hf(hf, dev_ids, 8)
        hf_out, st, t0, peak = run_hf(hf, dev_ids, args.new)
        results.append(summarize("transformers generate (DynamicCache, sdpa)", st, t0, args.batch, args.new, peak))
        agree = (hf_out[:, args.prompt_len:].cpu() == out[:, args.prompt_len:]).float().mean().item()
        try:
            run_hf(hf, dev_ids, 8, "static")
            _, st, t0, peak = run_hf(hf, dev_ids, args.new, "static")
            results.append(summarize("transformers generate (StaticCache, sdpa)", st, t0, args.batch, args.new, peak))
        except Exception as e:  # report, don't hide
            print(f"transformers static cache failed: {type(e).__name__}: {e}")

    best_hf = max((r["decode_tok_s"] for r in results if r["impl"].startswith("transformers")), default=None)
    print(f"\n{args.preset} random bf16 ({cfg.num_params / 1e9:.2f} B params), batch {args.batch}, "
          f"prompt {args.prompt_len}, {args.new} new tokens, greedy; GPU {torch.cuda.get_device_name()}; "
          f"torch {torch.__version__}\n")
    print("| implementation | prefill ms | decode step ms | decode tok/s | vs best transformers | e2e tok/s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['decode_tok_s'] / best_hf:.2f}x" if best_hf else "-"
        print(f"| {r['impl']} | {r['prefill_ms']:.1f} | {r['decode_step_ms']:.2f} | {r['decode_tok_s']:,.0f} | "
              f"{ratio} | {r['e2e_tok_s']:,.0f} | {r['peak_mem_gib']:.2f} |")
    if agree is not None:
        print(f"\ngreedy tokens identical to transformers' at {agree * 100:.1f}% of positions (bf16: "
              f"near-ties may flip after the first divergence)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "token_agreement": agree}, f, indent=2)


if __name__ == "__main__":
    main()
