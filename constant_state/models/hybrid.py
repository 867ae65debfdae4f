"""Hybrid decoder: a Llama-family Transformer whose chosen layers mix with Mamba-2 instead of attention.

Each layer keeps the Transformer's pre-norm / mixer / post-norm / SwiGLU shape; only the mixer
changes (Mamba-in-the-Llama style), so a hybrid converted from a Transformer keeps its MLPs,
norms and embeddings. Attention layers hold a paged KV cache, Mamba layers a constant-size state,
side by side in one ModelState; the generate loop does not know the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..cache.config import KVConfig
from ..state import ForwardContext, StateSpec
from .base import RMSNorm
from .config import TransformerConfig, parse_dtype, register_preset
from .mamba import Mamba2Config, Mamba2Mixer, init_ssm_params_
from .registry import Family, register_family
from .transformer import SwiGLU, Transformer, TransformerBlock


@dataclass
class HybridConfig(TransformerConfig):
    """A TransformerConfig plus the layers whose mixer is Mamba-2 and that mixer's shape."""

    family: ClassVar[str] = "hybrid"

    mamba_layers: list[int] = field(default_factory=list)
    """Indices of the layers that use a Mamba-2 mixer instead of attention."""
    mamba_expand: int = 1
    """Mamba inner width = mamba_expand x hidden_size."""
    mamba_head_dim: int | None = None
    """Channels per SSM head; default: the attention head_dim."""
    mamba_state_size: int | None = None
    """SSM state size (d_state); default: the attention head_dim (keys map onto B, queries onto C)."""
    mamba_n_groups: int | None = None
    """Groups sharing B and C; default: num_kv_heads (as GQA shares keys)."""
    mamba_conv_kernel: int = 4
    """Width of the causal conv."""
    mamba_chunk_size: int = 128
    """Chunk length of the prefill scan."""

    def __post_init__(self):
        super().__post_init__()
        bad = [i for i in self.mamba_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"mamba_layers {bad} out of range for num_layers={self.num_layers}")
        self.mamba_layers = sorted(set(self.mamba_layers))
        self.mamba_config()  # validates the mixer shape now

    def mamba_config(self) -> Mamba2Config:
        """The Mamba-2 shape of the hybrid's Mamba mixers (num_layers is that of the hybrid)."""
        return Mamba2Config(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                            state_size=self.mamba_state_size or self.head_dim, expand=self.mamba_expand,
                            conv_kernel=self.mamba_conv_kernel, head_dim=self.mamba_head_dim or self.head_dim,
                            n_groups=self.mamba_n_groups or self.num_kv_heads, chunk_size=self.mamba_chunk_size,
                            layer_norm_epsilon=self.rms_norm_eps, dtype=self.dtype)

    def state_specs(self, kv: KVConfig | None = None, dtype: torch.dtype | None = None) -> list[StateSpec]:
        attn = super().state_specs(kv)
        mamba = self.mamba_config().state_specs(None, dtype or parse_dtype(self.dtype))
        return [mamba[i] if i in self.mamba_layers else attn[i] for i in range(self.num_layers)]


class MambaMixerBlock(nn.Module):
    """A Transformer layer whose attention is replaced by a Mamba-2 mixer (same norms, same MLP)."""

    def __init__(self, cfg: HybridConfig, mcfg: Mamba2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer = Mamba2Mixer(mcfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, st, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.mixer(self.input_layernorm(x), st, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class HybridLM(Transformer):
    """Transformer with Mamba-2 mixers at ``config.mamba_layers``."""

    fp32_params = ("A_log", "mixer.D", "dt_bias")

    def __init__(self, cfg: HybridConfig):
        super().__init__(cfg)
        mcfg = cfg.mamba_config()
        for i in cfg.mamba_layers:
            self.layers[i] = MambaMixerBlock(cfg, mcfg)

    def state_specs(self, kv=None, dtype=None) -> list[StateSpec]:
        kv = KVConfig.coerce(kv) if kv is not None else self.kv_config
        return self.config.state_specs(kv, dtype or self.dtype)

    def init_state(self, batch_size: int, max_context: int | None = None, *, kv=None, num_blocks=None,
                   device=None):
        from ..state import ModelState

        kv_cfg = KVConfig.coerce(kv) if kv is not None else self.kv_config
        return ModelState.allocate(self.state_specs(kv_cfg), batch_size, max_context=max_context,
                                   num_blocks=num_blocks or kv_cfg.num_blocks, device=device or self.device)

    def init_random(self, gen: torch.Generator) -> None:
        """Mamba-style initialisation of the SSM parameters of the Mamba layers."""
        for i in self.config.mamba_layers:
            init_ssm_params_(self.layers[i].mixer, gen)


def _convert_keys(sd: dict[str, torch.Tensor], cfg: HybridConfig) -> dict[str, torch.Tensor]:
    if cfg.tie_word_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    return sd


register_family(Family("hybrid", HybridConfig, HybridLM, (), lambda hf: HybridConfig.from_dict(hf), _convert_keys))

# Llama-3-8B with every other layer from 1 on turned into Mamba-2 (a 50% Mamba-in-the-Llama hybrid).
register_preset("llama-3-8b-hybrid-50", HybridConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    rope_theta=500000.0, max_position_embeddings=131072, mamba_layers=list(range(1, 32, 2))))
