"""Typed model configs, their reading from Hugging Face config.json, and the state specs they imply."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..cache.config import KVConfig
from ..cache.formats import DTYPE_TO_FORMAT
from ..state import PagedKVSpec, StateSpec

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (--dtype); expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class ModelConfig:
    """Shared behaviour of the family configs (dataclasses)."""

    family: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["family"] = self.family
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"family"}
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def state_specs(self, kv: KVConfig | None = None) -> list[StateSpec]:
        raise NotImplementedError


def _require(hf: dict, key: str, model_type: str):
    if key not in hf:
        raise ValueError(f"config.json of model_type {model_type!r} is missing the field {key!r}")
    return hf[key]


@dataclass
class TransformerConfig(ModelConfig):
    """A Llama-family decoder (Llama 2/3, Mistral, Qwen2)."""

    family: ClassVar[str] = "transformer"

    vocab_size: int = 32000
    """Vocabulary size."""
    hidden_size: int = 4096
    """Model width."""
    intermediate_size: int = 11008
    """SwiGLU hidden width."""
    num_layers: int = 32
    """Decoder layers."""
    num_heads: int = 32
    """Query heads."""
    num_kv_heads: int | None = None
    """Key/value heads (GQA/MQA); default: num_heads."""
    head_dim: int | None = None
    """Per-head width; default: hidden_size // num_heads."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict | None = None
    """RoPE scaling: None, {"rope_type": "linear", "factor"} or Llama-3's {"rope_type": "llama3", ...}."""
    max_position_embeddings: int = 4096
    """Trained context length (informational; the cache capacity is set per state)."""
    tie_word_embeddings: bool = False
    """lm_head shares the embedding matrix."""
    qkv_bias: bool = False
    """Bias on q/k/v projections (Qwen2, Llama with attention_bias)."""
    o_bias: bool = False
    """Bias on the output projection (Llama with attention_bias)."""
    mlp_bias: bool = False
    """Bias on the SwiGLU projections."""
    sliding_window: int | None = None
    """Attention window in tokens for the layers listed in sliding_layers (Mistral: all)."""
    sliding_layers: list[int] | None = None
    """Layers using sliding_window; None with a window set means every layer."""
    model_type: str = "llama"
    """Hugging Face model_type this config came from."""
    dtype: str = "bfloat16"
    """Parameter dtype of the checkpoint."""
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) "
                                 f"unless head_dim is given")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise ValueError(f"rope_scaling.rope_type {kind!r} is not supported; expected default, linear or llama3")

    def window_for(self, layer_idx: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.sliding_layers is None or layer_idx in self.sliding_layers:
            return self.sliding_window
        return None

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = d * (q + 2 * kv) + q * d
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d
        emb = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + d

    def state_specs(self, kv: KVConfig | None = None) -> list[StateSpec]:
        kv = KVConfig.coerce(kv)
        default = DTYPE_TO_FORMAT[parse_dtype(self.dtype)]
        return [PagedKVSpec(layer_idx=i, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                            block_size=kv.block_size, kv_format=kv.format_for(i, default))
                for i in range(self.num_layers)]

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "TransformerConfig":
        mt = hf.get("model_type")
        rope = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        window, sliding_layers = None, None
        if mt == "mistral":
            window = hf.get("sliding_window")
        elif mt == "qwen2" and hf.get("use_sliding_window"):
            window = hf.get("sliding_window")
            types = hf.get("layer_types")
            if types:
                sliding_layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
            else:
                mwl = hf.get("max_window_layers", 0)
                sliding_layers = list(range(mwl, hf["num_hidden_layers"]))
        attn_bias = bool(hf.get("attention_bias", False))
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
        return cls(
            vocab_size=_require(hf, "vocab_size", mt),
            hidden_size=_require(hf, "hidden_size", mt),
            intermediate_size=_require(hf, "intermediate_size", mt),
            num_layers=_require(hf, "num_hidden_layers", mt),
            num_heads=_require(hf, "num_attention_heads", mt),
            num_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else attn_bias,
            o_bias=attn_bias if mt != "qwen2" else False,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=window,
            sliding_layers=sliding_layers,
            model_type=mt,
            dtype=str(dtype).replace("torch.", ""),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )


def _llama3_rope(max_pos=131072):
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


PRESETS: dict[str, ModelConfig] = {}


def register_preset(name: str, config: ModelConfig) -> None:
    PRESETS[name] = config


for _name, _cfg in {
    "llama-3-8b": TransformerConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                    num_heads=32, num_kv_heads=8, rope_theta=500000.0, rope_scaling=_llama3_rope(),
                                    max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama-3-70b": TransformerConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                                     num_heads=64, num_kv_heads=8, rope_theta=500000.0, rope_scaling=_llama3_rope(),
                                     max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama-3.2-1b": TransformerConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                      num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                                      rope_scaling={**_llama3_rope(), "factor": 32.0}, tie_word_embeddings=True,
                                      max_position_embeddings=131072),
    "llama-2-7b": TransformerConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                                    num_heads=32, rms_norm_eps=1e-5),
    "mistral-7b": TransformerConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                    num_heads=32, num_kv_heads=8, rope_theta=1000000.0, model_type="mistral",
                                    max_position_embeddings=32768),
    "qwen2-7b": TransformerConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                                  num_heads=28, num_kv_heads=4, rope_theta=1000000.0, qkv_bias=True,
                                  model_type="qwen2", max_position_embeddings=32768),
    # A tiny random model: the built-in default for demos and smoke runs.
    "tiny-llama": TransformerConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=4,
                                    num_heads=4, num_kv_heads=2, rope_theta=10000.0, dtype="float32"),
}.items():
    register_preset(_name, _cfg)
