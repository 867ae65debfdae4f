"""Model families: which config and module serve which Hugging Face ``model_type``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Family:
    """One model family: its config class, module class and checkpoint key conversion."""

    name: str
    config_cls: type
    model_cls: type
    hf_model_types: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any]], Any]
    convert_keys: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]]
    """Checkpoint tensors (their own names) -> this package's parameter names."""


FAMILIES: dict[str, Family] = {}
MODEL_TYPES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    FAMILIES[family.name] = family
    for mt in family.hf_model_types:
        MODEL_TYPES[mt] = family


def family_for_model_type(model_type: str | None) -> Family:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r} in config.json; supported: {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def family_for_config(config) -> Family:
    for f in FAMILIES.values():
        if isinstance(config, f.config_cls):
            return f
    raise TypeError(f"no model family for config {type(config).__name__}")


def _convert_transformer(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        out[k[len("model."):] if k.startswith("model.") else k] = v
    return out


def _register_builtin() -> None:
    from .config import TransformerConfig
    from .transformer import Transformer

    register_family(Family("transformer", TransformerConfig, Transformer, ("llama", "mistral", "qwen2"),
                           TransformerConfig.from_hf, _convert_transformer))


_register_builtin()
