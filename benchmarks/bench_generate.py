"""End-to-end generation: our loop (CUDA-graph decode on a paged KV cache) beside transformers' generate.

Same random Llama-shaped weights in both, same prompts, greedy, fixed number of new tokens.
Prints a markdown table: decode step time (difference of a long and a short run, so prefill and
graph capture cancel), decode tokens/s, end-to-end
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


def timed(fn) -> tuple[float, object, int]:
    """(seconds, result, peak bytes) of one call, GPU work included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out, torch.cuda.max_memory_allocated()


def measure(name: str, gen, batch: int, short: int, long: int, repeats: int = 3) -> tuple[dict, object]:
    """Decode step time from the difference of a long and a short run (prefill, graph capture and
    first-call costs cancel); prefill from a one-token run. Medians over ``repeats``."""
    gen(8)  # warm-up: kernels, allocator, autotuning
    t1 = statistics.median(timed(lambda: gen(1))[0] for _ in range(repeats))
    ts = statistics.median(timed(lambda: gen(short))[0] for _ in range(repeats))
    runs = [timed(lambda: gen(long)) for _ in range(repeats)]
    tl = statistics.median(r[0] for r in runs)
    step = (tl - ts) / (long - short)
    return {
        "impl": name,
        "prefill_ms": t1 * 1e3,
        "decode_step_ms": step * 1e3,
        "decode_tok_s": batch / step,
        "e2e_tok_s": batch * long / tl,
        "peak_mem_gib": max(r[2] for r in runs) / 2 ** 30,
    }, runs[-1][1]


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
    short = max(8, args.new // 4)
    ours = lambda n, graph=True: model.generate(prompts, max_new_tokens=n, cuda_graph=graph)
    r, out = measure(f"constant_state paged {model.state_specs()[0].kv_format}, CUDA graph", ours, args.batch,
                     short, args.new)
    results.append(r)
    r, _ = measure("constant_state eager", lambda n: ours(n, False), args.batch, short, args.new, repeats=1)
    results.append(r)
    agree = first_agree = None
    if not args.skip_hf:
        hf = to_hf(model, cfg)
        del model
        torch.cuda.empty_cache()
        dev_ids = ids.cuda()
        mask = torch.ones_like(dev_ids)

        def hf_gen(n, cache=None):
            kw = {"cache_implementation": cache} if cache else {}
            return hf.generate(dev_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, **kw)

        r, hf_out = measure("transformers generate (DynamicCache, sdpa)", hf_gen, args.batch, short, args.new)
        results.append(r)
        hf_new, our_new = hf_out[:, args.prompt_len:].cpu(), out[:, args.prompt_len:]
        agree = (hf_new == our_new).float().mean().item()
        first_agree = (hf_new[:, 0] == our_new[:, 0]).float().mean().item()
        try:
            r, _ = measure("transformers generate (StaticCache, sdpa; transformers compiles its decode step)",
                           lambda n: hf_gen(n, "static"), args.batch, short, args.new)
            results.append(r)
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
        print(f"\ngreedy tokens identical to transformers': first new token {first_agree * 100:.1f}% of rows, "
              f"all positions {agree * 100:.1f}% (bf16 near-ties on random weights flip, then sequences diverge)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "token_agreement": agree, "first_token_agreement": first_agree}, f, indent=2)


if __name__ == "__main__":
    main()
