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
    from . import _load_all  # noqa: F401  (every family registers itself on import)

    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r} in config.json; supported: {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def family_for_config(config) -> Family:
    from . import _load_all  # noqa: F401

    family = FAMILIES.get(getattr(config, "family", None))
    if family is None or not isinstance(config, family.config_cls):
        raise TypeError(f"no model family for config {type(config).__name__}")
    return family
