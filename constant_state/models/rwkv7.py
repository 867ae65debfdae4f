"""RWKV-7 "Goose" (x070): constant-size state (token shifts plus an fp32 wkv state per layer).

Matches the rwkv package's ``RWKV_x070`` (BlinkDL) math. Loads BlinkDL ``.pth`` checkpoints and the
fla-hub Hugging Face format (``model_type: rwkv7``). ``v_first`` (layer 0's values, mixed into every
later layer) is threaded per call through ``ctx.extras``, never stored in the state.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..cache.config import KVConfig
from ..kernels.rwkv7 import BACKENDS, timemix_core
from ..state import ForwardContext, RecurrentSpec, RecurrentState, StateSpec, TensorSpec
from .base import StatefulLM
from .config import ModelConfig, _require, parse_dtype, register_preset
from .registry import Family, register_family

MIX_NAMES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")


def _lora(c: int, scale: float) -> int:
    """BlinkDL's suggested LoRA width for model width ``c``."""
    return max(32, int(round(scale * c ** 0.5 / 32) * 32))


@dataclass
class RWKV7Config(ModelConfig):
    """An RWKV-7 (x070) language model."""

    family: ClassVar[str] = "rwkv7"

    vocab_size: int = 65536
    """Vocabulary size."""
    hidden_size: int = 768
    """Model width C."""
    num_layers: int = 12
    """Blocks (time mix + channel mix)."""
    head_size: int = 64
    """Per-head width N of the wkv state (N x N per head)."""
    intermediate_size: int | None = None
    """Channel-mix hidden width; default: 4 * hidden_size."""
    decay_lora: int | None = None
    """Rank of the decay (w) LoRA; default: BlinkDL's rule from hidden_size."""
    a_lora: int | None = None
    """Rank of the in-context learning rate (a) LoRA; default: BlinkDL's rule."""
    v_lora: int | None = None
    """Rank of the value-residual (v) LoRA; default: BlinkDL's rule."""
    gate_lora: int | None = None
    """Rank of the output gate (g) LoRA; default: BlinkDL's rule."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon; the per-head GroupNorm uses head_size * norm_eps (64e-5)."""
    kernel: str = "auto"
    """wkv backend: auto (Triton on CUDA, PyTorch reference on CPU), triton or torch."""
    tie_word_embeddings: bool = False
    """lm_head shares the embedding matrix (never in released RWKV-7 models)."""
    model_type: str = "rwkv7"
    """Source format: rwkv7 (fla-hub Hugging Face) or blinkdl (.pth)."""
    dtype: str = "bfloat16"
    """Parameter dtype; the token-shift state uses it too (the wkv state is always fp32)."""
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        c = self.hidden_size
        if c % self.head_size:
            raise ValueError(f"hidden_size ({c}) must be a multiple of head_size ({self.head_size})")
        if self.kernel not in BACKENDS:
            raise ValueError(f"kernel {self.kernel!r} unknown; expected one of {BACKENDS}")
        self.intermediate_size = self.intermediate_size or 4 * c
        self.decay_lora = self.decay_lora or _lora(c, 1.8)
        self.a_lora = self.a_lora or _lora(c, 1.8)
        self.v_lora = self.v_lora or _lora(c, 1.3)
        self.gate_lora = self.gate_lora or max(32, int(round(0.6 * c ** 0.8 / 32) * 32))

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    def state_specs(self, kv: KVConfig | None = None) -> list[StateSpec]:
        shift = parse_dtype(self.dtype)
        c, h, n = self.hidden_size, self.num_heads, self.head_size
        return [RecurrentSpec(layer_idx=i, tensors=(TensorSpec("att_shift", (c,), shift),
                                                    TensorSpec("ffn_shift", (c,), shift),
                                                    TensorSpec("wkv", (h, n, n), torch.float32)))
                for i in range(self.num_layers)]

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "RWKV7Config":
        """From an fla-hub ``config.json`` (model_type rwkv7)."""
        mt = hf.get("model_type")
        c = _require(hf, "hidden_size", mt)
        head = hf.get("head_dim") or (c // hf["num_heads"] if hf.get("num_heads") else 64)
        vd = hf.get("value_dim")
        if vd is not None and any(x != c for x in (vd if isinstance(vd, list) else [vd])):
            raise ValueError(f"config.json: value_dim {vd} != hidden_size {c} is not supported")
        if hf.get("norm_first") is False or hf.get("norm_bias") is False:
            raise ValueError("config.json: only norm_first=true, norm_bias=true RWKV-7 models are supported")
        if hf.get("hidden_act", "sqrelu") != "sqrelu":
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} unsupported; expected sqrelu")
        inter = hf.get("intermediate_size")
        if inter is None:
            inter = 32 * ((int(c * (hf.get("hidden_ratio") or 4)) + 31) // 32)
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
        return cls(vocab_size=_require(hf, "vocab_size", mt), hidden_size=c,
                   num_layers=_require(hf, "num_hidden_layers", mt), head_size=head, intermediate_size=inter,
                   decay_lora=hf.get("decay_low_rank_dim"), a_lora=hf.get("a_low_rank_dim"),
                   v_lora=hf.get("v_low_rank_dim"), gate_lora=hf.get("gate_low_rank_dim"),
                   norm_eps=hf.get("norm_eps", 1e-5), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   model_type="rwkv7", dtype=str(dtype).replace("torch.", ""),
                   bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def _shift_mix(x: torch.Tensor, shift: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Token-shift lerps ``x + (prev - x) * coeffs[i]`` -> ``[n, B, T, C]``, where ``prev`` is the previous
    token (``shift`` for the first); then ``shift`` <- the last token, in place."""
    if x.shape[1] == 1:
        delta = shift[:, None].to(x.dtype) - x  # [B, 1, C]
    else:
        delta = torch.cat([shift[:, None].to(x.dtype), x[:, :-1]], dim=1) - x  # [B, T, C]
    mixed = torch.addcmul(x, delta, coeffs[:, None, None])  # [n, B, T, C]
    shift.copy_(x[:, -1])
    return mixed


class TimeMix(nn.Module):
    """RWKV-7 time mixing: token-shift lerps, LoRA-style w/a/v/g, the wkv7 recurrence, GroupNorm, gate."""

    def __init__(self, cfg: RWKV7Config, layer_idx: int):
        super().__init__()
        c, n = cfg.hidden_size, cfg.head_size
        self.layer_idx, self.num_heads, self.head_size = layer_idx, cfg.num_heads, n
        self.cfg = cfg
        # The six lerp coefficients x_r, x_w, x_k, x_v, x_a, x_g stacked: one op instead of six.
        self.x_mix = nn.Parameter(torch.empty(6, c))
        self.w0, self.w1, self.w2 = (nn.Parameter(torch.empty(c)), nn.Parameter(torch.empty(c, cfg.decay_lora)),
                                     nn.Parameter(torch.empty(cfg.decay_lora, c)))
        self.a0, self.a1, self.a2 = (nn.Parameter(torch.empty(c)), nn.Parameter(torch.empty(c, cfg.a_lora)),
                                     nn.Parameter(torch.empty(cfg.a_lora, c)))
        if layer_idx > 0:
            self.v0, self.v1, self.v2 = (nn.Parameter(torch.empty(c)), nn.Parameter(torch.empty(c, cfg.v_lora)),
                                         nn.Parameter(torch.empty(cfg.v_lora, c)))
        self.g1, self.g2 = nn.Parameter(torch.empty(c, cfg.gate_lora)), nn.Parameter(torch.empty(cfg.gate_lora, c))
        self.k_k, self.k_a = nn.Parameter(torch.empty(c)), nn.Parameter(torch.empty(c))
        self.r_k = nn.Parameter(torch.empty(cfg.num_heads, n))
        self.receptance = nn.Linear(c, c, bias=False)
        self.key = nn.Linear(c, c, bias=False)
        self.value = nn.Linear(c, c, bias=False)
        self.output = nn.Linear(c, c, bias=False)
        self.ln_x = nn.GroupNorm(cfg.num_heads, c, eps=n * cfg.norm_eps)

    def forward(self, x: torch.Tensor, st: RecurrentState, ctx: ForwardContext) -> torch.Tensor:
        xr, xw, xk, xv, xa, xg = _shift_mix(x, st["att_shift"], self.x_mix)  # each [B, T, C]
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        w_lo = torch.tanh(xw @ self.w1) @ self.w2
        a_lo = (xa @ self.a1) @ self.a2
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        if self.layer_idx == 0:
            ctx.extras["v_first"] = v
            v_lo = v_first = v0 = None
        else:
            v_lo, v_first, v0 = (xv @ self.v1) @ self.v2, ctx.extras["v_first"], self.v0
        y = timemix_core(r, k, v, w_lo, a_lo, v_lo, v_first, g, self.w0, self.a0, v0, self.k_k, self.k_a, self.r_k,
                         self.ln_x.weight, self.ln_x.bias, self.ln_x.eps, st["wkv"], backend=self.cfg.kernel)
        return self.output(y)


class ChannelMix(nn.Module):
    """RWKV-7 channel mixing: token-shift lerp, squared-ReLU MLP."""

    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(cfg.hidden_size))
        self.key = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.value = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, st: RecurrentState) -> torch.Tensor:
        xk = _shift_mix(x, st["ffn_shift"], self.x_k[None])[0]
        return self.value(torch.relu(self.key(xk)).square())


class RWKV7Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_idx: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.att = TimeMix(cfg, layer_idx)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ffn = ChannelMix(cfg)

    def forward(self, x: torch.Tensor, st: RecurrentState, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.att(self.ln1(x), st, ctx)
        return x + self.ffn(self.ln2(x), st)


class RWKV7(StatefulLM):
    """RWKV-7 causal LM. Names follow BlinkDL's ``.pth`` (``blocks.i`` -> ``layers.i``, ``emb`` ->
    ``embed_tokens``, ``blocks.0.ln0`` -> ``ln0``, ``ln_out`` -> ``norm``, ``head`` -> ``lm_head``; the six
    ``att.x_*`` lerp vectors stacked as ``att.x_mix``)."""

    def __init__(self, cfg: RWKV7Config):
        # A private copy: set_kernel() (and a caller editing model.config) must not change the registered
        # preset or another model built from the same config object.
        cfg = dataclasses.replace(cfg)
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.ln0 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(RWKV7Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Layer 0's ln0 on the embeddings (the rwkv package folds it into emb.weight at load time).
        return self.ln0(self.embed_tokens(input_ids))

    def set_kernel(self, backend: str) -> None:
        """Force the wkv backend: auto, triton or torch."""
        if backend not in BACKENDS:
            raise ValueError(f"kernel expected one of {BACKENDS}, got {backend!r}")
        self.config.kernel = backend

    @torch.no_grad()
    def init_random(self, gen: torch.Generator) -> None:
        """Weights in the ranges trained RWKV-7 models have (called by build_model after N(0, 0.02))."""
        cfg = self.config
        c = cfg.hidden_size

        def rand(*shape, lo=0.0, hi=1.0):
            return torch.rand(shape, generator=gen) * (hi - lo) + lo

        def put(p, val):
            p.copy_(val.to(p.dtype))

        for mod in (self.ln0, self.norm, *(m for blk in self.layers for m in (blk.ln1, blk.ln2, blk.att.ln_x))):
            put(mod.weight, rand(c, lo=0.7, hi=1.3))
            put(mod.bias, rand(c, lo=-0.1, hi=0.1))
        for i, blk in enumerate(self.layers):
            att = blk.att
            put(att.x_mix, rand(6, c))
            put(att.w0, rand(c, lo=-6.0, hi=1.0))
            put(att.a0, rand(c, lo=-0.5, hi=0.5))
            put(att.k_k, rand(c, lo=0.6, hi=1.0))
            put(att.k_a, rand(c, lo=0.8, hi=1.2))
            put(att.r_k, rand(cfg.num_heads, cfg.head_size, lo=-0.1, hi=0.1))
            if i > 0:
                put(att.v0, rand(c, lo=0.0, hi=1.0))
            for name in ("w1", "w2", "a1", "a2", "g1", "g2") + (("v1", "v2") if i > 0 else ()):
                p = getattr(att, name)
                put(p, torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[0]))
            for lin in (att.receptance, att.key, att.value, att.output, blk.ffn.key, blk.ffn.value):
                put(lin.weight, torch.randn(lin.weight.shape, generator=gen) / math.sqrt(lin.weight.shape[1]))
            put(blk.ffn.x_k, rand(c))
        put(self.embed_tokens.weight, torch.randn(self.embed_tokens.weight.shape, generator=gen))
        if not cfg.tie_word_embeddings:
            put(self.lm_head.weight, torch.randn(self.lm_head.weight.shape, generator=gen) / math.sqrt(c))


# -- checkpoint formats ------------------------------------------------------------------------------

def config_from_blinkdl(sd: dict[str, torch.Tensor], dtype: str = "float32") -> RWKV7Config:
    """Shapes of a BlinkDL ``.pth`` state dict -> config (it carries no config file)."""
    if "blocks.0.att.r_k" not in sd or "emb.weight" not in sd:
        raise ValueError("not an RWKV-7 (x070) .pth: expected keys 'emb.weight' and 'blocks.0.att.r_k'")
    h, n = sd["blocks.0.att.r_k"].shape
    vocab, c = sd["emb.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return RWKV7Config(vocab_size=vocab, hidden_size=c, num_layers=layers, head_size=n,
                       intermediate_size=sd["blocks.0.ffn.key.weight"].shape[0],
                       decay_lora=sd["blocks.0.att.w1"].shape[1], a_lora=sd["blocks.0.att.a1"].shape[1],
                       v_lora=sd["blocks.1.att.v1"].shape[1] if layers > 1 else None,
                       gate_lora=sd["blocks.0.att.g1"].shape[1], model_type="blinkdl", dtype=dtype)


def convert_blinkdl(sd: dict[str, torch.Tensor], cfg: RWKV7Config) -> dict[str, torch.Tensor]:
    """BlinkDL ``.pth`` names (the rwkv package's format) -> ours."""
    out: dict[str, torch.Tensor] = {}
    mix: dict[int, dict[str, torch.Tensor]] = {}
    top = {"emb.weight": "embed_tokens.weight", "ln_out.weight": "norm.weight", "ln_out.bias": "norm.bias",
           "head.weight": "lm_head.weight", "blocks.0.ln0.weight": "ln0.weight", "blocks.0.ln0.bias": "ln0.bias"}
    for key, val in sd.items():
        if key in top:
            out[top[key]] = val
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m is None:
            raise ValueError(f".pth: unexpected tensor {key!r}")
        i, rest = int(m.group(1)), m.group(2)
        if i == 0 and rest in ("att.v0", "att.v1", "att.v2"):
            continue  # present in trained checkpoints, unused in layer 0
        if rest.startswith("att.") and rest[4:] in MIX_NAMES:
            mix.setdefault(i, {})[rest[4:]] = val.reshape(-1)
            continue
        if rest in ("att.w0", "att.a0", "att.v0", "att.k_k", "att.k_a", "ffn.x_k"):
            val = val.reshape(-1)
        out[f"layers.{i}.{rest}"] = val
    for i, parts in mix.items():
        missing = [n for n in MIX_NAMES if n not in parts]
        if missing:
            raise ValueError(f".pth: blocks.{i}.att is missing {missing}")
        out[f"layers.{i}.att.x_mix"] = torch.stack([parts[n] for n in MIX_NAMES])
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


_FLA_ATT = {"r_proj.weight": "receptance.weight", "k_proj.weight": "key.weight", "v_proj.weight": "value.weight",
            "o_proj.weight": "output.weight", "g_norm.weight": "ln_x.weight", "g_norm.bias": "ln_x.bias",
            "k_k": "k_k", "k_a": "k_a", "r_k": "r_k"}
_FLA_LORA = {"w_lora": ("w0", "w1", "w2"), "a_lora": ("a0", "a1", "a2"), "v_lora": ("v0", "v1", "v2"),
             "g_lora": (None, "g1", "g2")}


def convert_fla(sd: dict[str, torch.Tensor], cfg: RWKV7Config) -> dict[str, torch.Tensor]:
    """fla-hub Hugging Face names (fla's RWKV7ForCausalLM) -> ours.

    fla's ``LoRA`` is ``Linear(C, r) -> act -> Linear(r, C, bias)``: ``lora.0.weight`` is ``w1^T``,
    ``lora.2.weight`` is ``w2^T`` and ``lora.2.bias`` is ``w0``.
    """
    out: dict[str, torch.Tensor] = {}
    mix: dict[int, dict[str, torch.Tensor]] = {}
    top = {"model.embeddings.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
           "model.norm.bias": "norm.bias", "lm_head.weight": "lm_head.weight",
           "model.layers.0.pre_norm.weight": "ln0.weight", "model.layers.0.pre_norm.bias": "ln0.bias"}
    blk = {"attn_norm": "ln1", "ffn_norm": "ln2"}
    for key, val in sd.items():
        if key in top:
            out[top[key]] = val
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(.+)", key)
        if m is None:
            raise ValueError(f"fla checkpoint: unexpected tensor {key!r}")
        i, part, rest = int(m.group(1)), m.group(2), m.group(3)
        p = f"layers.{i}."
        if part in blk:
            out[p + f"{blk[part]}.{rest}"] = val
        elif part == "ffn":
            out[p + f"ffn.{rest}"] = val.reshape(-1) if rest == "x_k" else val
        elif part == "attn" and rest in MIX_NAMES:
            mix.setdefault(i, {})[rest] = val.reshape(-1)
        elif part == "attn" and rest in _FLA_ATT:
            out[p + "att." + _FLA_ATT[rest]] = val
        elif part == "attn" and (lm := re.fullmatch(r"(\w_lora)\.lora\.(\d)\.(weight|bias)", rest)):
            bias, down, up = _FLA_LORA[lm.group(1)]
            idx, kind = lm.group(2), lm.group(3)
            name = down if idx == "0" else (bias if kind == "bias" else up)
            if name is None:
                raise ValueError(f"fla checkpoint: unexpected tensor {key!r}")
            out[p + "att." + name] = val if kind == "bias" else val.t()
        else:
            raise ValueError(f"fla checkpoint: unexpected tensor {key!r}")
    for i, parts in mix.items():
        out[f"layers.{i}.att.x_mix"] = torch.stack([parts[n] for n in MIX_NAMES])
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def convert_keys(sd: dict[str, torch.Tensor], cfg: RWKV7Config) -> dict[str, torch.Tensor]:
    if "emb.weight" in sd:
        return convert_blinkdl(sd, cfg)
    if "model.embeddings.weight" in sd:
        return convert_fla(sd, cfg)
    return sd  # our own names (save_checkpoint)


def config_from_pth(path) -> RWKV7Config:
    """The config of a BlinkDL ``.pth`` (tensors memory-mapped, not read)."""
    sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return config_from_blinkdl(sd, dtype=str(next(iter(sd.values())).dtype).replace("torch.", ""))


def load_pth(path, *, device=None, dtype=None) -> RWKV7:
    """A model from a BlinkDL ``.pth`` file (torch.load with weights_only=True)."""
    from .hf import assign_weights

    sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    dt = parse_dtype(dtype, next(iter(sd.values())).dtype)
    cfg = config_from_blinkdl(sd, dtype=str(dt).replace("torch.", ""))
    with torch.device("meta"):
        model = RWKV7(cfg)
    assign_weights(model, convert_blinkdl(sd, cfg), dt, device or "cpu", source=str(path))
    model.checkpoint_dir = path
    return model.eval()


for _name, _cfg in {
    "rwkv7-0.1b": RWKV7Config(hidden_size=768, num_layers=12, decay_lora=64, a_lora=64, v_lora=32, gate_lora=128),
    "rwkv7-0.4b": RWKV7Config(hidden_size=1024, num_layers=24, decay_lora=64, a_lora=64, v_lora=32, gate_lora=128),
    "rwkv7-1.5b": RWKV7Config(hidden_size=2048, num_layers=24, decay_lora=96, a_lora=96, v_lora=64, gate_lora=256),
    "rwkv7-2.9b": RWKV7Config(hidden_size=2560, num_layers=32, decay_lora=96, a_lora=96, v_lora=64, gate_lora=320),
}.items():
    register_preset(_name, _cfg)

register_family(Family("rwkv7", RWKV7Config, RWKV7, ("rwkv7",), RWKV7Config.from_hf, convert_keys))
