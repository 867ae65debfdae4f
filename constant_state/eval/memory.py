"""Exact memory accounting read off the state specs: per sequence and per batch, for any context."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..cache.config import KVConfig
from ..cache.formats import format_names
from ..state import PagedKVSpec, RecurrentSpec, spec_bytes_per_sequence

_SUFFIX = {"": 1, "k": 1024, "m": 1024 ** 2}


def parse_tokens(text: str | int) -> int:
    """'128k' -> 131072, '1m' -> 1048576, '4096' -> 4096 (k = 1024 tokens)."""
    if isinstance(text, int):
        n = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
        if not m:
            raise ValueError(f"--context expects a token count like 4096, 32k or 1m, got {text!r}")
        n = int(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"--context must be positive, got {text!r}")
    return n


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


@dataclass
class MemoryRow:
    model: str
    family: str
    kv_format: str
    context: int
    batch: int
    per_sequence: int
    total: int
    kv_layers: int
    recurrent_layers: int
    bytes_per_token: float

    def to_dict(self) -> dict:
        return dict(self.__dict__, per_sequence_human=human_bytes(self.per_sequence), total_human=human_bytes(self.total))


def held_tokens(kv: KVConfig, context: int) -> int:
    """Tokens a sequence of ``context`` tokens keeps in its cache: all of them, or at most the
    eviction policy's bound (sink block, window or budget, and the block being filled)."""
    policy = kv.eviction_policy()
    bs = kv.block_size
    if policy is None:
        return context
    if policy.name == "streaming":
        bound = -(-policy.sinks // bs) * bs + (-(-policy.window // bs) + 1) * bs
    else:
        bound = (-(-policy.budget // bs) + 1) * bs
    return min(context, bound)


def memory_rows(name: str, config, context: int, batch: int, kv_formats: list[str],
                kv: Callable[[str], KVConfig] | None = None) -> list[MemoryRow]:
    """One row per KV format (one row for models without attention layers). ``kv``: the format's
    ``KVConfig`` as a function of its name (the CLI's --kv-* flags; each format keeps its own default
    block size unless they set one: 32 for kivi2, else 16); default: each format's defaults."""
    rows = []
    probe = config.state_specs(KVConfig())
    has_kv = any(isinstance(s, PagedKVSpec) for s in probe)
    for fmt in (kv_formats if has_kv else ["-"]):
        cfg = (kv or (lambda f: KVConfig(format=f)))(fmt) if has_kv else KVConfig()
        specs = config.state_specs(cfg)
        per_seq = spec_bytes_per_sequence(specs, held_tokens(cfg, context) if has_kv else context)
        paged = [s for s in specs if isinstance(s, PagedKVSpec)]
        per_tok = sum(s.page_size_bytes / s.block_size for s in paged)
        label = paged[0].kv_format if paged else "-"
        rows.append(MemoryRow(name, config.family, label, context, batch, per_seq, per_seq * batch,
                              len(paged), sum(isinstance(s, RecurrentSpec) for s in specs), per_tok))
    return rows


def resolve_kv_formats(kv: list[str] | None) -> list[str]:
    if not kv:
        return ["auto"]
    if "all" in kv:
        # Registered names, without the kivi2 variants registered on first use by a config.
        return [f for f in format_names() if not (f.startswith("kivi2-"))]
    return kv


def format_table(rows: list[MemoryRow]) -> str:
    head = ["model", "family", "kv", "context", "batch", "state/token", "per sequence", "total", "bytes/seq"]
    lines = [head]
    for r in rows:
        lines.append([r.model, r.family, r.kv_format, f"{r.context:,}", str(r.batch),
                      human_bytes(r.bytes_per_token) if r.kv_layers else "0 (constant)",
                      human_bytes(r.per_sequence), human_bytes(r.total), f"{r.per_sequence:,}"])
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    fmt = lambda l: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths)))
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(l) for l in lines[1:]])
