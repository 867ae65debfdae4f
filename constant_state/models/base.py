"""The protocol every model family implements: ``logits, state = model(input_ids, state)``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..cache.config import KVConfig
from ..state import ForwardContext, ModelState, StateSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class StatefulLM(nn.Module):
    """Base class of every causal LM here: embeddings, a stack of stateful layers, norm, head.

    Subclasses build ``embed_tokens``, ``layers`` (each with ``state_spec`` via the config and
    ``forward(x, layer_state, ctx)``), ``norm`` and ``lm_head``, and may override
    :meth:`prepare_context` (per-call values such as RoPE tables) and :meth:`embed`.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.kv_config = KVConfig()
        self.tokenizer = None

    # -- state --------------------------------------------------------------------------------
    def state_specs(self, kv: KVConfig | str | dict | None = None) -> list[StateSpec]:
        """Per-layer memory declarations for this model (and KV config, for attention layers)."""
        return self.config.state_specs(KVConfig.coerce(kv) if kv is not None else self.kv_config)

    def init_state(self, batch_size: int, max_context: int | None = None, *,
                   kv: KVConfig | str | dict | None = None, num_blocks: int | None = None,
                   device=None) -> ModelState:
        """An empty state for ``batch_size`` sequences of up to ``max_context`` tokens each.

        ``num_blocks`` sizes the KV block pool (default: batch_size x max_context worth of
        blocks); give more to fork rows or share prefixes without running out.
        """
        kv_cfg = KVConfig.coerce(kv) if kv is not None else self.kv_config
        return ModelState.allocate(self.config.state_specs(kv_cfg), batch_size, max_context=max_context,
                                   num_blocks=num_blocks or kv_cfg.num_blocks, device=device or self.device,
                                   eviction=kv_cfg.eviction_policy())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, state: ModelState | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, ModelState]:
        """Consume ``input_ids [B, T]``; return logits ``[B, T, V]`` (``[B, 1, V]`` if last_only)
        and the same ``state`` object, updated in place. Without a state: a full forward from an
        empty state sized to the input."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a LongTensor [batch, tokens], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        b, t = input_ids.shape
        if state is None:
            state = self.init_state(b, max_context=t)
        elif state.batch_size != b:
            raise ValueError(f"input_ids has batch {b} but the state holds {state.batch_size} sequences")
        state.reserve(t)
        return self.forward_reserved(input_ids, state, last_only=last_only), state

    def forward_reserved(self, input_ids: torch.Tensor, state: ModelState, last_only: bool = False) -> torch.Tensor:
        """Device part of a forward, after ``state.reserve(T)``: no host sync, graph-capturable."""
        return self.lm_head(self.forward_hidden(input_ids, state, last_only))

    def forward_hidden(self, input_ids: torch.Tensor, state: ModelState, last_only: bool = False) -> torch.Tensor:
        """The backbone (embeddings, layers, final norm) of :meth:`forward_reserved`, without the head."""
        t = input_ids.shape[1]
        ctx = state.context(t)
        self.prepare_context(ctx)
        x = self.embed(input_ids)
        for layer, layer_state in zip(self.layers, state.layers):
            x = layer(x, layer_state, ctx)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        state.advance(t)
        return x

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def prepare_context(self, ctx: ForwardContext) -> None:
        """Fill per-call values shared by all layers (RoPE tables, ...)."""

    # -- generation ---------------------------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: int = 32, **kwargs: Any) -> torch.Tensor:
        """Prefill then decode; see :func:`constant_state.generate.generate`."""
        from ..generate import generate
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
