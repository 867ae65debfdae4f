"""Save a recurrent-only :class:`ModelState` to disk and load it back (prompt caching).

One safetensors file: tensors ``layers.<i>.<name>`` ``[B, *shape]`` plus ``seq_lens``, and JSON
metadata (format version, batch size, per-layer specs) checked against the model on load.
Written atomically: a temporary file in the same directory, then ``os.replace``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .state import ModelState, RecurrentState

FORMAT = "constant_state.recurrent_state/1"


def _spec_json(specs) -> list:
    return [None if s is None else {"layer_idx": s.layer_idx,
                                    "tensors": [[t.name, list(t.shape), str(t.dtype).replace("torch.", "")]
                                                for t in s.tensors]}
            for s in specs]


def save_state(state: ModelState, path: str | Path) -> None:
    """Write ``state`` (every layer recurrent) to ``path`` atomically."""
    from safetensors.torch import save_file

    if state.has_paged or any(l is not None and not isinstance(l, RecurrentState) for l in state.layers):
        raise ValueError("save_state supports recurrent-only states (Mamba, RWKV); this one has paged KV layers")
    tensors = {"seq_lens": state.seq_lens.detach().to("cpu", torch.int64).contiguous()}
    for i, layer in enumerate(state.layers):
        if layer is not None:
            for name, t in layer.tensors.items():
                tensors[f"layers.{i}.{name}"] = t.detach().cpu().contiguous()
    meta = {"format": FORMAT, "batch_size": str(state.batch_size),
            "seq_lens": json.dumps(state.seq_lens_host), "specs": json.dumps(_spec_json(state.specs))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_state(path: str | Path, model, device=None) -> ModelState:
    """A new state for ``model`` holding the saved one; raises ValueError if the specs differ."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no saved state at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a saved state (format {meta.get('format')!r}, expected {FORMAT!r})")
        saved_specs = json.loads(meta["specs"])
        batch = int(meta["batch_size"])
        state = model.init_state(batch, device=device)
        expected = _spec_json(state.specs)
        if saved_specs != expected:
            bad = next(i for i, (a, b) in enumerate(zip(saved_specs + [None] * len(expected), expected)) if a != b)
            raise ValueError(f"{path}: saved state does not fit this model (layer {bad}: saved "
                             f"{saved_specs[bad] if bad < len(saved_specs) else None}, model expects {expected[bad]}; "
                             f"{len(saved_specs)} vs {len(expected)} layers)")
        for i, layer in enumerate(state.layers):
            if isinstance(layer, RecurrentState):
                for name, t in layer.tensors.items():
                    t.copy_(f.get_tensor(f"layers.{i}.{name}"))
        state.seq_lens.copy_(f.get_tensor("seq_lens"))
    for seq, n in zip(state.seqs, json.loads(meta["seq_lens"])):
        seq.num_tokens = int(n)
    return state


__all__ = ["save_state", "load_state"]
