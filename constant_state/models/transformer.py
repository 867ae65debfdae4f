"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) on a paged KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..state import ForwardContext, PagedKVState
from .base import RMSNorm, StatefulLM
from .config import TransformerConfig
from .registry import Family, register_family


def rope_inv_freq(cfg: TransformerConfig) -> torch.Tensor:
    """Inverse RoPE frequencies ``[head_dim / 2]`` in fp32, with linear or Llama-3 scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    sc = cfg.rope_scaling
    if sc:
        kind = sc.get("rope_type", sc.get("type"))
        factor = float(sc["factor"])
        if kind == "linear":
            inv = inv / factor
        elif kind == "llama3":
            low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
            old = float(sc["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old / low, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / high) & (wavelen <= old / low)
            inv = torch.where(medium, smoothed, scaled)
    return inv.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, T, H, D]`` rotated by ``cos, sin [B, T, D]`` (half-split convention)."""
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer_idx: int):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.o_bias)
        self.scale = hd ** -0.5
        self.window = cfg.window_for(layer_idx)

    def forward(self, x: torch.Tensor, kv: PagedKVState, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)  # [B, T, Hq, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        cos, sin = ctx.extras["rope"]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv.write(k, v, ctx)
        o = kv.attend(q, ctx, self.scale, self.window)  # [B, T, Hq, D]
        return self.o_proj(o.reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, kv: PagedKVState, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(StatefulLM):
    """Llama-family causal LM. Parameter names follow Hugging Face's without the ``model.`` prefix."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq = rope_inv_freq(cfg)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def prepare_context(self, ctx: ForwardContext) -> None:
        if self._inv_freq.device != ctx.positions.device:
            self._inv_freq = self._inv_freq.to(ctx.positions.device)
        freqs = ctx.positions.float()[..., None] * self._inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        ctx.extras["rope"] = (emb.cos(), emb.sin())


def _convert_hf_keys(sd: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        out[k[len("model."):] if k.startswith("model.") else k] = v
    return out


register_family(Family("transformer", TransformerConfig, Transformer, ("llama", "mistral", "qwen2"),
                       TransformerConfig.from_hf, _convert_hf_keys))
