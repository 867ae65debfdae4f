"""Typed configuration of the paged KV cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class KVConfig:
    """How attention layers store their keys and values."""

    format: str = "auto"
    """Storage format (--kv): auto (the model's dtype), bf16, fp16, fp32, or a quantized format."""
    block_size: int | None = None
    """Tokens per KV block (--kv-block-size); default 16, or 32 when a layer stores kivi2 (its keys are
    quantized per channel over a block: 32-token blocks halve the key-scale bytes; 64 saves 9% more
    bytes and decodes faster, with coarser key groups: docs/kv_cache.md)."""
    num_blocks: int | None = None
    """Blocks in the pool; default: enough for batch_size x max_context (--kv-blocks)."""
    layer_formats: dict[int, str] = field(default_factory=dict)
    """Per-layer overrides of ``format``, keyed by layer index."""
    group_size: int | None = None
    """Dims per scale group: int4 32 or 64 (default 64), kivi2 values 32, 64 or 128 (default 64) (--kv-group-size)."""
    residual_window: int | None = None
    """kivi2: newest tokens per sequence kept fp16, a multiple of block_size (default 128) (--kv-residual)."""
    eviction: str = "none"
    """Token eviction: none, streaming (StreamingLLM sinks + window) or h2o (heavy hitters) (--kv-eviction)."""
    sink_tokens: int | None = None
    """streaming: first tokens always kept (default 4) (--kv-sinks)."""
    window_tokens: int | None = None
    """Recent tokens kept: streaming default 1020, h2o default budget // 2 (--kv-window)."""
    budget: int | None = None
    """h2o: tokens kept per sequence, recent window included (default 1024) (--kv-budget)."""

    def __post_init__(self):
        if self.block_size is None:
            kivi = any(str(f).startswith("kivi2") for f in {self.format, *self.layer_formats.values()})
            self.block_size = 32 if kivi else 16
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"KVConfig.block_size (--kv-block-size) must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"KVConfig.num_blocks (--kv-blocks) must be positive, got {self.num_blocks}")

        if self.residual_window is not None and (self.residual_window <= 0 or self.residual_window % self.block_size):
            raise ValueError(f"KVConfig.residual_window (--kv-residual) must be a positive multiple of the block "
                             f"size {self.block_size} (--kv-block-size), got {self.residual_window}")
        for fmt in {self.format, *self.layer_formats.values()}:
            self.format_for(-1, "bf16", fmt)  # validates --kv-group-size / --kv-residual against the format
        policy = self.eviction_policy()  # validates --kv-eviction / --kv-sinks / --kv-window / --kv-budget
        if policy is not None and any(f.startswith("kivi2") for f in {self.format, *self.layer_formats.values()}):
            raise ValueError("--kv-eviction does not combine with --kv kivi2 (its residual groups are aligned "
                             "to cache positions); choose another format or --kv-eviction none")

    def eviction_policy(self):
        """The :mod:`constant_state.cache.eviction` policy of these settings, or None."""
        from .eviction import make_policy

        if self.eviction == "none" and (self.sink_tokens, self.window_tokens, self.budget) != (None, None, None):
            raise ValueError("--kv-sinks / --kv-window / --kv-budget need --kv-eviction streaming or h2o")
        return make_policy(self.eviction, sinks=self.sink_tokens, window=self.window_tokens, budget=self.budget)

    def format_for(self, layer_idx: int, default: str, fmt: str | None = None) -> str:
        """The resolved format name of a layer (settings such as the int4 group size folded in)."""
        from .quant import DEFAULT_KIVI_GROUP, DEFAULT_KIVI_RESIDUAL, int4_name, kivi_name

        fmt = fmt or self.layer_formats.get(layer_idx, self.format)
        if fmt == "auto":
            return default
        if fmt == "int4" and self.group_size is not None:
            return int4_name(self.group_size)
        if fmt == "kivi2":
            return kivi_name(self.group_size or DEFAULT_KIVI_GROUP, self.residual_window or DEFAULT_KIVI_RESIDUAL)
        return fmt

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def coerce(cls, kv: "KVConfig | str | dict | None") -> "KVConfig":
        """Accept a KVConfig, a format name (``"int8"``), a dict of fields, or None."""
        if kv is None:
            return cls()
        if isinstance(kv, cls):
            return kv
        if isinstance(kv, str):
            return cls(format=kv)
        if isinstance(kv, dict):
            unknown = set(kv) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown KVConfig field(s) {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}")
            return cls(**kv)
        raise TypeError(f"kv must be a KVConfig, a format name or a dict, got {type(kv).__name__}")
