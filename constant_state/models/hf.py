"""Loading: Hugging Face checkpoints (local directory or hub id), our own checkpoints, presets."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..cache.config import KVConfig
from .base import StatefulLM
from .config import PRESETS, ModelConfig, parse_dtype
from .registry import FAMILIES, Family, family_for_config, family_for_model_type

log = logging.getLogger(__name__)


def resolve_checkpoint_dir(path_or_id: str) -> Path:
    """A local directory, or a hub id downloaded to the local cache (needs network)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(f"--model {path_or_id!r} is a file; pass the checkpoint directory holding config.json")
    if "/" not in path_or_id or path_or_id.startswith((".", "/")):
        raise ValueError(f"--model {path_or_id!r}: no such directory and not a preset; presets: {sorted(PRESETS)}")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                  "*.txt", "*.pth", "*.bin"]))
    except Exception as e:  # network, auth or missing repo: say which
        raise ValueError(f"--model {path_or_id!r}: not a local directory and the hub download failed "
                         f"({type(e).__name__}: {e})") from e


def read_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors (single or sharded) or pytorch_model.bin."""
    from safetensors.torch import load_file

    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (ckpt / shard).exists():
                raise ValueError(f"{index}: shard {shard!r} listed in weight_map is missing")
            out.update(load_file(str(ckpt / shard)))
        return out
    files = sorted(ckpt.glob("*.safetensors"))
    if files:
        out = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    binf = ckpt / "pytorch_model.bin"
    if binf.exists():
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise ValueError(f"no weights in {ckpt}: expected model.safetensors, a sharded index or pytorch_model.bin")


def assign_weights(model: StatefulLM, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device,
                   source: str = "checkpoint") -> None:
    """Load ``tensors`` (our names) into ``model`` (built on the meta device), checking names and shapes."""
    expected = model.state_dict()
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [k for k in expected if k not in tensors and k not in tied]
    if missing:
        raise ValueError(f"{source}: missing weight(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)} of {len(expected)})")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise ValueError(f"{source}: unexpected weight(s) {unexpected[:5]} for this config")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{source}: weight {k!r} has shape {tuple(v.shape)}, the config implies "
                             f"{tuple(expected[k].shape)}")
    float_dtype = lambda v: dtype if v.is_floating_point() else v.dtype
    keep_fp32 = getattr(model, "fp32_params", ())
    sd = {k: v.to(device=device, dtype=torch.float32 if any(k.endswith(s) for s in keep_fp32) else float_dtype(v))
          for k, v in tensors.items() if k not in tied}
    model.load_state_dict(sd, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def build_model(config: ModelConfig, *, device=None, dtype=None, seed: int | None = 0,
                family: Family | None = None) -> StatefulLM:
    """A randomly initialised model of ``config`` (benchmarks, tests, presets)."""
    family = family or family_for_config(config)
    device = torch.device(device or "cpu")
    dtype = parse_dtype(dtype, parse_dtype(getattr(config, "dtype", None)))
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    with torch.device("meta"):
        model = family.model_cls(config)
    tensors = {}
    for name, t in model.state_dict().items():
        tensors[name] = _init_tensor(name, t, gen)
    assign_weights(model, tensors, dtype, device, source=f"random {family.name}")
    if hasattr(model, "init_random"):
        model.init_random(gen)
    return model.eval()


def _init_tensor(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """HF-like init: weights N(0, 0.02), norms 1, biases 0."""
    if "norm" in name or name.endswith(("ln_out.weight",)):
        return torch.ones(t.shape) if name.endswith("weight") else torch.zeros(t.shape)
    if name.endswith("bias"):
        return torch.zeros(t.shape)
    if not t.dtype.is_floating_point:
        return torch.zeros(t.shape, dtype=t.dtype)
    return torch.randn(t.shape, generator=gen) * 0.02


def _blinkdl_pth(path: str | Path) -> Path | None:
    """A BlinkDL RWKV ``.pth`` (no config.json): the file itself, or the only .pth of a directory."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".pth":
        return p
    if p.is_dir() and not (p / "config.json").exists():
        pths = sorted(p.glob("*.pth"))
        if len(pths) == 1:
            return pths[0]
    return None


MODEL_TYPE_DETECTORS: list[Callable[[dict[str, Any]], str | None]] = []
"""Families add functions here that name the model_type of a config.json without one
(e.g. mamba-ssm's MambaLMHeadModel configs: d_model, n_layer, ssm_cfg)."""


def model_type_of(raw: dict[str, Any]) -> str | None:
    """The model_type of a config.json: its own field, else the first detector's answer."""
    from . import _load_all  # noqa: F401  (families register their detectors on import)

    if "model_type" in raw:
        return raw["model_type"]
    return next((mt for mt in (d(raw) for d in MODEL_TYPE_DETECTORS) if mt), None)


def load_checkpoint(path: str | Path, *, device=None, dtype=None) -> StatefulLM:
    """A model from a checkpoint directory: HF config.json (model_type) or ours (family), or a
    BlinkDL RWKV-7 ``.pth`` (shapes inferred from its tensors)."""
    pth = _blinkdl_pth(path)
    if pth is not None:
        from .rwkv7 import load_pth
        return load_pth(pth, device=device, dtype=dtype)
    ckpt = resolve_checkpoint_dir(str(path))
    cfg_file = ckpt / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{ckpt} has no config.json")
    raw = json.loads(cfg_file.read_text())
    if "family" in raw and raw["family"] in FAMILIES:
        family = FAMILIES[raw["family"]]
        config = family.config_cls.from_dict(raw)
    else:
        family = family_for_model_type(model_type_of(raw))
        config = family.config_from_hf(raw)
    dtype = parse_dtype(dtype, parse_dtype(getattr(config, "dtype", None)))
    with torch.device("meta"):
        model = family.model_cls(config)
    tensors = family.convert_keys(read_state_dict(ckpt), config)
    assign_weights(model, tensors, dtype, device or "cpu", source=str(ckpt))
    model.tokenizer = _maybe_tokenizer(ckpt)
    model.checkpoint_dir = ckpt
    return model.eval()


def _maybe_tokenizer(ckpt: Path):
    if not any((ckpt / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(ckpt))
    except Exception as e:  # a broken tokenizer should not block loading weights
        log.warning("could not load the tokenizer in %s: %s", ckpt, e)
        return None


def load(path_or_preset: str, *, device=None, dtype=None, kv: KVConfig | str | dict | None = None,
         seed: int = 0) -> StatefulLM:
    """Load a model: a built-in preset name (random weights), a local checkpoint directory or a hub id.

    ``kv`` selects the KV cache format / block size of attention layers (``"bf16"``, a
    :class:`KVConfig`, or a dict of its fields).
    """
    if path_or_preset in PRESETS and not os.path.isdir(path_or_preset):
        model = build_model(PRESETS[path_or_preset], device=device, dtype=dtype, seed=seed)
        model.preset = path_or_preset
    else:
        model = load_checkpoint(path_or_preset, device=device, dtype=dtype)
    model.kv_config = KVConfig.coerce(kv)
    model.state_specs()  # validates the KV format names now, not at the first forward
    return model


def resolve_config(path_or_preset: str) -> ModelConfig:
    """The config of a preset or of a checkpoint directory / config.json, without loading weights."""
    if path_or_preset in PRESETS and not os.path.exists(path_or_preset):
        return PRESETS[path_or_preset]
    pth = _blinkdl_pth(path_or_preset)
    if pth is not None:
        from .rwkv7 import config_from_pth
        return config_from_pth(pth)
    p = Path(path_or_preset).expanduser()
    cfg_file = p if p.is_file() else resolve_checkpoint_dir(path_or_preset) / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"--model {path_or_preset!r}: no config.json at {cfg_file}")
    raw: dict[str, Any] = json.loads(cfg_file.read_text())
    if "family" in raw and raw["family"] in FAMILIES:
        return FAMILIES[raw["family"]].config_cls.from_dict(raw)
    return family_for_model_type(model_type_of(raw)).config_from_hf(raw)


def save_checkpoint(model: StatefulLM, path: str | Path) -> None:
    """Write ``model`` as safetensors plus our JSON config, atomically (temp dir, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(model.config.to_json())
    if path.exists():
        old = path.with_name(path.name + ".old")
        os.replace(path, old)
        os.replace(tmp, path)
        import shutil
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
