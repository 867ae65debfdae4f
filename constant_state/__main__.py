"""The ``constant-state`` command line: one table of subcommands, each a plain function."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

DEFAULT_MEMORY_MODELS = ["llama-3-8b", "llama-3-70b", "llama-3-8b-hybrid-50", "mamba-2.8b", "mamba2-2.7b", "rwkv7-2.9b"]


def _add_kv_args(p: argparse.ArgumentParser, allow_all: bool = False) -> None:
    p.add_argument("--kv", action="append" if allow_all else "store", default=None, metavar="FORMAT",
                   help="KV cache format of attention layers (auto = model dtype, bf16, fp16, fp32"
                        + (", ...; repeat it or say 'all')" if allow_all else ", ...)"))
    p.add_argument("--kv-block-size", type=int, default=None,
                   help="tokens per KV block (default 16; 32 with --kv kivi2)")
    p.add_argument("--kv-group-size", type=int, default=None, help="int4 / kivi2 dims per scale group (32, 64)")
    p.add_argument("--kv-residual", type=int, default=None, help="kivi2: fp16 residual window in tokens (128)")
    p.add_argument("--kv-eviction", default="none", choices=["none", "streaming", "h2o"],
                   help="evict tokens: StreamingLLM sinks + window, or H2O heavy hitters (default none)")
    p.add_argument("--kv-sinks", type=int, default=None, help="streaming: sink tokens kept (default 4)")
    p.add_argument("--kv-window", type=int, default=None,
                   help="recent tokens kept (streaming default 1020, h2o default budget/2)")
    p.add_argument("--kv-budget", type=int, default=None, help="h2o: tokens kept per sequence (default 1024)")


def _kv_config(args: argparse.Namespace, fmt: str | None = None):
    """The KVConfig of the --kv* flags (``fmt`` overrides --kv)."""
    from .cache.config import KVConfig

    return KVConfig(format=fmt or args.kv or "auto", block_size=args.kv_block_size, group_size=args.kv_group_size,
                    residual_window=args.kv_residual, eviction=args.kv_eviction, sink_tokens=args.kv_sinks,
                    window_tokens=args.kv_window, budget=args.kv_budget)


def cmd_memory(args: argparse.Namespace) -> int:
    """Exact KV / state bytes per sequence and for a batch, read off the state specs."""
    from .eval.memory import format_table, memory_rows, parse_tokens, resolve_kv_formats
    from .models.hf import resolve_config

    context = parse_tokens(args.context)
    if args.batch <= 0:
        raise ValueError(f"--batch must be positive, got {args.batch}")
    formats = resolve_kv_formats(args.kv)
    _kv_config(args, "auto")  # validates the --kv-* flags
    rows = []
    for name in args.model or DEFAULT_MEMORY_MODELS:
        cfg = resolve_config(name)
        # each format with its own default block size (kivi2 32) unless --kv-block-size says one
        for r in memory_rows(name, cfg, context, args.batch, formats, lambda fmt: _kv_config(args, fmt)):
            rows.append(r)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0


def _memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", metavar="PATH_OR_PRESET",
                   help=f"preset name, checkpoint dir or config.json; repeatable (default: {' '.join(DEFAULT_MEMORY_MODELS)})")
    p.add_argument("--context", default="128k", help="tokens per sequence, e.g. 4096, 32k, 128k (default 128k)")
    p.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_kv_args(p, allow_all=True)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text (or token ids) from a preset or a checkpoint."""
    import torch

    from . import load
    from .cache.config import KVConfig
    from .tokenizer import tokenizer_for

    kv = _kv_config(args)
    model = load(args.model, device=args.device, dtype=args.dtype, kv=kv)
    tok = tokenizer_for(model)
    if args.prompt_ids:
        prompts = [[int(t) for t in s.split(",")] for s in args.prompt_ids]
    elif args.prompt:
        if tok is None:
            raise ValueError("--prompt needs a tokenizer; this model has none and a vocabulary under 256: "
                             "use --prompt-ids")
        prompts = [tok.encode(p) for p in args.prompt]
    else:
        raise ValueError("give --prompt TEXT or --prompt-ids 1,2,3")
    bad = [t for p in prompts for t in p if not 0 <= t < model.config.vocab_size]
    if bad:
        raise ValueError(f"--prompt-ids: token id(s) {bad[:5]} outside the vocabulary of {model.config.vocab_size}")
    stop = list(args.stop or [])
    eos = getattr(tok, "eos_token_id", None) if tok is not None else None
    if eos is not None and not args.ignore_eos:
        stop.append(eos)
    stream = len(prompts) == 1 and tok is not None and not args.ids and not args.prompt_ids
    pieces: list[int] = []

    def on_tokens(step: int, tokens: torch.Tensor) -> None:
        pieces.append(int(tokens[0]))
        sys.stdout.write(tok.decode([pieces[-1]]))
        sys.stdout.flush()

    if stream:
        sys.stdout.write(args.prompt[0] if args.prompt else "")
    out = model.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stop,
                         on_tokens=on_tokens if stream else None,
                         cuda_graph=False if args.no_cuda_graph else None)
    if stream:
        sys.stdout.write("\n")
        return 0
    width = max(len(p) for p in prompts)
    for p, row in zip(prompts, out.tolist()):
        new = row[width:]
        if args.ids or args.prompt_ids or tok is None:
            print(",".join(map(str, new)))
        else:
            print(tok.decode(p + new))
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH_OR_PRESET", help="preset name, checkpoint dir or hub id")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--prompt-ids", action="append", metavar="IDS", help="comma-separated token ids; repeatable")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", type=int, action="append", metavar="ID", help="stop token id; repeatable")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    p.add_argument("--ids", action="store_true", help="print generated token ids, not text")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA")
    _add_kv_args(p)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str]] = {
    "generate": (cmd_generate, _generate_args, "generate text from a model"),
    "memory": (cmd_memory, _memory_args, "exact KV cache / state memory per sequence and per batch"),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="constant-state", description="Long-context inference memory: "
                                     "paged/quantized KV caches beside constant-size recurrent states.")
    parser.add_argument("--version", action="version", version=f"constant-state {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=fn.__doc__)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"constant-state {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
