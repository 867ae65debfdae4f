"""Mamba-1 and Mamba-2 language models with constant-size per-layer state (conv + SSM).

Each layer's state is a :class:`RecurrentState` with ``conv_state [B, C, K]`` (the last ``K``
inputs of the depthwise conv, mamba-ssm's layout) and ``ssm_state`` (``[B, D, N]`` for Mamba-1,
``[B, H, P, N]`` for Mamba-2), updated in place. A mixer picks its ops from the input length:
one token takes the step path, more take the chunked scan, which always starts from the state
held (so a prompt may be prefilled in chunks). Ops come from :mod:`constant_state.kernels.mamba`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.config import KVConfig
from ..kernels.mamba import get_ops
from ..state import ForwardContext, ModelState, RecurrentSpec, RecurrentState, TensorSpec
from .base import StatefulLM
from .config import ModelConfig, parse_dtype, register_preset
from .hf import MODEL_TYPE_DETECTORS
from .registry import Family, register_family

INF_LIMIT = (0.0, float("inf"))


def _dtype_name(hf: dict) -> str:
    return str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")


def _check_act(hf: dict) -> None:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json hidden_act {act!r} is not supported; Mamba layers need 'silu'")


def _as_float(v) -> float:
    """A float from JSON: numbers, None (no limit), or HF's {"__float__": "Infinity"}."""
    if v is None:
        return float("inf")
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    return float(v)


def _pad_vocab(v: int, multiple: int) -> int:
    return v if not multiple else -(-v // multiple) * multiple


@dataclass
class _MambaCommon(ModelConfig):
    """Fields shared by both Mamba generations."""

    vocab_size: int = 50280
    """Vocabulary size (rows of the embedding, padded as in the checkpoint)."""
    hidden_size: int = 768
    """Model width (d_model)."""
    num_layers: int = 24
    """Mamba blocks (n_layer)."""
    state_size: int = 16
    """SSM state size per channel (d_state)."""
    expand: int = 2
    """Inner width = expand x hidden_size."""
    conv_kernel: int = 4
    """Width of the depthwise causal conv (d_conv); the conv state holds this many inputs."""
    use_bias: bool = False
    """Bias on in_proj / out_proj."""
    use_conv_bias: bool = True
    """Bias on the conv."""
    layer_norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    residual_in_fp32: bool = True
    """Keep the residual stream in fp32."""
    tie_word_embeddings: bool = True
    """lm_head shares the embedding matrix."""
    dtype: str = "float16"
    """Parameter dtype of the checkpoint."""
    ssm_state_dtype: str | None = None
    """dtype of the SSM state; None: the parameter dtype (as mamba-ssm). The conv state always has the
    parameter dtype (causal-conv1d needs it)."""
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0

    def _state_dtypes(self, dtype: torch.dtype | None) -> tuple[torch.dtype, torch.dtype]:
        """(conv state dtype, SSM state dtype) for parameters of ``dtype`` (default: the checkpoint's)."""
        conv = dtype or parse_dtype(self.dtype)
        return conv, parse_dtype(self.ssm_state_dtype) if self.ssm_state_dtype else conv


@dataclass
class MambaConfig(_MambaCommon):
    """Mamba-1 (state-spaces/mamba-*; HF MambaForCausalLM)."""

    family: ClassVar[str] = "mamba"

    time_step_rank: int | None = None
    """Rank of the dt projection; default ceil(hidden_size / 16)."""
    intermediate_size: int | None = None
    """Inner width; default expand x hidden_size."""
    model_type: str = "mamba"
    """Hugging Face model_type."""

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = self.expand * self.hidden_size
        if self.time_step_rank is None:
            self.time_step_rank = math.ceil(self.hidden_size / 16)

    def state_specs(self, kv: KVConfig | None = None, dtype: torch.dtype | None = None) -> list[RecurrentSpec]:
        cdt, sdt = self._state_dtypes(dtype)
        d = self.intermediate_size
        return [RecurrentSpec(layer_idx=i, tensors=(TensorSpec("conv_state", (d, self.conv_kernel), cdt),
                                                    TensorSpec("ssm_state", (d, self.state_size), sdt)))
                for i in range(self.num_layers)]

    @property
    def num_params(self) -> int:
        d, e, n, r = self.hidden_size, self.intermediate_size, self.state_size, self.time_step_rank
        # in_proj, conv (+bias), x_proj, dt_proj (+bias), A_log, D, out_proj
        mixer = d * 2 * e + e * (self.conv_kernel + 1) + e * (r + 2 * n) + (r + 1) * e + e * n + e + e * d
        return self.num_layers * (mixer + d) + self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "MambaConfig":
        if "d_model" in hf:
            return cls(**_from_mamba_ssm(hf, 1))
        _check_act(hf)
        rank = hf.get("time_step_rank", "auto")
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                   state_size=hf.get("state_size", 16), expand=hf.get("expand", 2),
                   conv_kernel=hf.get("conv_kernel", 4), time_step_rank=None if rank == "auto" else int(rank),
                   intermediate_size=hf.get("intermediate_size"), use_bias=bool(hf.get("use_bias", False)),
                   use_conv_bias=bool(hf.get("use_conv_bias", True)),
                   layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                   residual_in_fp32=bool(hf.get("residual_in_fp32", True)),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), dtype=_dtype_name(hf),
                   bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


@dataclass
class Mamba2Config(_MambaCommon):
    """Mamba-2 (state-spaces/mamba2-*; HF Mamba2ForCausalLM)."""

    family: ClassVar[str] = "mamba2"

    state_size: int = 128
    """SSM state size per head channel (d_state)."""
    head_dim: int = 64
    """Channels per SSM head (headdim)."""
    num_heads: int | None = None
    """SSM heads; default expand x hidden_size / head_dim."""
    n_groups: int = 1
    """Groups sharing B and C (ngroups); also the groups of the gated RMSNorm."""
    chunk_size: int = 256
    """Chunk length of the prefill scan."""
    time_step_limit: tuple[float, float] = INF_LIMIT
    """Clamp of dt after softplus, applied to every token (prefill and decode)."""
    norm_before_gate: bool = False
    """Gated RMSNorm order: norm(x) * silu(z) if True, norm(x * silu(z)) if False (HF, mamba-ssm default)."""
    model_type: str = "mamba2"
    """Hugging Face model_type."""

    def __post_init__(self):
        inner = self.expand * self.hidden_size
        if self.num_heads is None:
            if inner % self.head_dim:
                raise ValueError(f"expand x hidden_size ({inner}) must divide by head_dim ({self.head_dim})")
            self.num_heads = inner // self.head_dim
        if self.num_heads * self.head_dim != inner:
            raise ValueError(f"num_heads x head_dim ({self.num_heads} x {self.head_dim}) must equal expand x "
                             f"hidden_size ({inner}); change num_heads or head_dim")
        if self.num_heads % self.n_groups:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups})")
        self.time_step_limit = tuple(_as_float(v) for v in self.time_step_limit)
        if len(self.time_step_limit) != 2 or not 0 <= self.time_step_limit[0] <= self.time_step_limit[1]:
            raise ValueError(f"time_step_limit must be (low, high) with 0 <= low <= high, got {self.time_step_limit}")

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    def state_specs(self, kv: KVConfig | None = None, dtype: torch.dtype | None = None) -> list[RecurrentSpec]:
        cdt, sdt = self._state_dtypes(dtype)
        return [RecurrentSpec(layer_idx=i, tensors=(
            TensorSpec("conv_state", (self.conv_dim, self.conv_kernel), cdt),
            TensorSpec("ssm_state", (self.num_heads, self.head_dim, self.state_size), sdt)))
            for i in range(self.num_layers)]

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "Mamba2Config":
        if "d_model" in hf:
            return cls(**_from_mamba_ssm(hf, 2))
        _check_act(hf)
        limit = hf.get("time_step_limit") or INF_LIMIT
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                   state_size=hf.get("state_size", 128), expand=hf.get("expand", 2),
                   conv_kernel=hf.get("conv_kernel", 4), head_dim=hf.get("head_dim", 64),
                   num_heads=hf.get("num_heads"), n_groups=hf.get("n_groups", 1),
                   chunk_size=hf.get("chunk_size", 256), time_step_limit=tuple(limit),
                   use_bias=bool(hf.get("use_bias", False)), use_conv_bias=bool(hf.get("use_conv_bias", True)),
                   layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                   residual_in_fp32=bool(hf.get("residual_in_fp32", True)),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=_dtype_name(hf),
                   bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def _from_mamba_ssm(raw: dict[str, Any], version: int) -> dict[str, Any]:
    """Fields of our config from mamba-ssm's MambaLMHeadModel config.json (d_model, n_layer, ssm_cfg)."""
    ssm = dict(raw.get("ssm_cfg") or {})
    if raw.get("d_intermediate", 0):
        raise ValueError(f"mamba-ssm config d_intermediate={raw['d_intermediate']}: MLP blocks are not supported")
    if raw.get("attn_layer_idx"):
        raise ValueError(f"mamba-ssm config attn_layer_idx={raw['attn_layer_idx']}: attention layers are not "
                         f"supported in the mamba families")
    if not raw.get("rms_norm", True):
        raise ValueError("mamba-ssm config rms_norm=false (LayerNorm) is not supported")
    out = dict(vocab_size=_pad_vocab(raw["vocab_size"], raw.get("pad_vocab_size_multiple", 8)),
               hidden_size=raw["d_model"], num_layers=raw["n_layer"], expand=ssm.get("expand", 2),
               conv_kernel=ssm.get("d_conv", 4), use_bias=bool(ssm.get("bias", False)),
               use_conv_bias=bool(ssm.get("conv_bias", True)), layer_norm_epsilon=raw.get("norm_epsilon", 1e-5),
               residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
               tie_word_embeddings=bool(raw.get("tie_embeddings", True)), dtype=_dtype_name(raw),
               model_type="mamba" if version == 1 else "mamba2")
    if version == 1:
        rank = ssm.get("dt_rank", "auto")
        out.update(state_size=ssm.get("d_state", 16), time_step_rank=None if rank == "auto" else int(rank))
    else:
        if ssm.get("D_has_hdim") or ssm.get("d_ssm") not in (None, out["expand"] * out["hidden_size"]):
            raise ValueError("mamba-ssm Mamba2 ssm_cfg D_has_hdim / d_ssm are not supported")
        if not ssm.get("rmsnorm", True):
            raise ValueError("mamba-ssm Mamba2 ssm_cfg rmsnorm=false is not supported")
        out.update(state_size=ssm.get("d_state", 128), head_dim=ssm.get("headdim", 64),
                   n_groups=ssm.get("ngroups", 1), chunk_size=ssm.get("chunk_size", 256),
                   time_step_limit=tuple(ssm.get("dt_limit", INF_LIMIT)),
                   norm_before_gate=bool(ssm.get("norm_before_gate", False)))
    return out


def detect_mamba_ssm(raw: dict[str, Any]) -> str | None:
    """model_type of a mamba-ssm MambaLMHeadModel config.json (it has none), else None."""
    if "model_type" in raw or not {"d_model", "n_layer"} <= raw.keys():
        return None
    return "mamba2" if (raw.get("ssm_cfg") or {}).get("layer", "Mamba1") == "Mamba2" else "mamba"


# -- modules --------------------------------------------------------------------------------------

class MambaRMSNorm(nn.Module):
    """RMSNorm whose output has the weight's dtype (the residual may be fp32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype
        x = x.to(dtype).float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class _Mixer(nn.Module):
    backend: str | None = None  # None: the env var / auto (see kernels.mamba.backend)

    def ops(self, device):
        return get_ops(device, self.backend)


class MambaMixer(_Mixer):
    """Mamba-1 selective SSM mixer; parameter names as in HF / mamba-ssm."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        d, e, n, r = cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
        self.d_inner, self.d_state, self.dt_rank = e, n, r
        self.in_proj = nn.Linear(d, 2 * e, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(e, e, cfg.conv_kernel, groups=e, bias=cfg.use_conv_bias)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n))
        self.D = nn.Parameter(torch.empty(e))
        self.out_proj = nn.Linear(e, d, bias=cfg.use_bias)

    def forward(self, h: torch.Tensor, st: RecurrentState, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = h.shape
        ops = self.ops(h.device)
        e, n, r = self.d_inner, self.d_state, self.dt_rank
        A = -torch.exp(self.A_log.float())  # [E, N]
        w = self.conv1d.weight.squeeze(1)  # [E, K]
        if t == 1:
            xz = self.in_proj(h[:, 0])  # [B, 2E]
            x, z = xz[:, :e], xz[:, e:]
            x = ops.causal_conv1d_update(x, st["conv_state"], w, self.conv1d.bias, "silu")  # [B, E]
            dbc = self.x_proj(x)  # [B, R + 2N]
            dt = F.linear(dbc[:, :r], self.dt_proj.weight)  # [B, E]
            y = ops.selective_state_update(st["ssm_state"], x, dt, A, dbc[:, r:r + n], dbc[:, r + n:], self.D,
                                           z, self.dt_proj.bias, True)  # [B, E]
            return self.out_proj(y)[:, None]
        # Channel-first [B, 2E, T] straight from the matmul (mamba-ssm's layout, no transposed copies).
        xz = (self.in_proj.weight @ h.reshape(b * t, -1).T).view(2 * e, b, t).permute(1, 0, 2)  # [B, 2E, T]
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[None, :, None]
        x, z = xz[:, :e], xz[:, e:]
        fresh = ctx.extras.get("mamba_fresh", False)
        x = ops.causal_conv1d(x, w, self.conv1d.bias, st["conv_state"], "silu", fresh)  # [B, E, T]
        dbc = self.x_proj(x.transpose(1, 2).reshape(b * t, e))  # [B*T, R + 2N]
        dt = (self.dt_proj.weight @ dbc[:, :r].T).view(e, b, t).permute(1, 0, 2)  # [B, E, T]
        Bm = dbc[:, r:r + n].reshape(b, t, n).transpose(1, 2).contiguous()  # [B, N, T]
        Cm = dbc[:, r + n:].reshape(b, t, n).transpose(1, 2).contiguous()  # [B, N, T]
        y, last = ops.selective_scan(x, dt, A, Bm, Cm, self.D.float(), z, self.dt_proj.bias.float(),
                                     st["ssm_state"], fresh)  # [B, E, T]
        st["ssm_state"].copy_(last)
        return self.out_proj(y.transpose(1, 2))


class Mamba2Mixer(_Mixer):
    """Mamba-2 (SSD) mixer with gated RMSNorm; parameter names as in HF / mamba-ssm."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        e, h = cfg.intermediate_size, cfg.num_heads
        self.in_proj = nn.Linear(cfg.hidden_size, e + cfg.conv_dim + h, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim,
                                bias=cfg.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(h))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, hs: torch.Tensor, st: RecurrentState, ctx: ForwardContext) -> torch.Tensor:
        c = self.cfg
        b, t, _ = hs.shape
        ops = self.ops(hs.device)
        e, h, p, g, n = c.intermediate_size, c.num_heads, c.head_dim, c.n_groups, c.state_size
        A = -torch.exp(self.A_log.float())  # [H]
        w = self.conv1d.weight.squeeze(1)  # [C, K]
        limited = tuple(c.time_step_limit) != INF_LIMIT
        zxbcdt = self.in_proj(hs)  # [B, T, E + C + H]
        z, xbc, dt = zxbcdt.split([e, c.conv_dim, h], dim=-1)
        if t == 1:
            xbc = ops.causal_conv1d_update(xbc[:, 0], st["conv_state"], w, self.conv1d.bias, "silu")  # [B, C]
            x, Bm, Cm = xbc.split([e, g * n, g * n], dim=-1)
            dt, dt_bias = dt[:, 0, :, None].expand(b, h, p), self.dt_bias  # stride 0 over P: tied head dim
            if limited:  # softplus and clamp here: the step kernel has no clamp
                dt = F.softplus(dt.float() + self.dt_bias.float()[:, None]).clamp(*c.time_step_limit)
                dt_bias = None  # dt is materialised (not tied), so the kernel never reads dt_bias's strides
            y = ops.selective_state_update(
                st["ssm_state"], x.reshape(b, h, p), dt,
                A[:, None, None].expand(h, p, n), Bm.reshape(b, g, n), Cm.reshape(b, g, n),
                self.D.float()[:, None].expand(h, p), None,
                None if dt_bias is None else dt_bias.float()[:, None].expand(h, p), not limited)  # [B, H, P]
            y = y.reshape(b, 1, e)
        else:
            xbc = ops.causal_conv1d(xbc.transpose(1, 2), w, self.conv1d.bias, st["conv_state"], "silu",
                                    ctx.extras.get("mamba_fresh", False))  # [B, C, T]
            xbc = xbc.transpose(1, 2).contiguous()  # [B, T, C] (a no-op for channel-last output)
            x, Bm, Cm = xbc.split([e, g * n, g * n], dim=-1)
            y, final = ops.ssd(x.reshape(b, t, h, p), dt, A, Bm.reshape(b, t, g, n), Cm.reshape(b, t, g, n),
                               c.chunk_size, self.D.float(), self.dt_bias.float(), c.time_step_limit,
                               st["ssm_state"], ctx.extras.get("mamba_fresh", False))  # [B, T, H, P]
            st["ssm_state"].copy_(final)
            y = y.reshape(b, t, e)
        y = ops.gated_rmsnorm(y, z, self.norm.weight, c.layer_norm_epsilon, e // g, c.norm_before_gate)
        return self.out_proj(y.to(hs.dtype))


class MambaBlock(nn.Module):
    def __init__(self, cfg, mixer: nn.Module):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = MambaRMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = mixer

    def forward(self, x: torch.Tensor, st: RecurrentState, ctx: ForwardContext) -> torch.Tensor:
        residual = x.float() if self.residual_in_fp32 else x
        return residual + self.mixer(self.norm(x), st, ctx)


class MambaLM(StatefulLM):
    """Mamba-1 or Mamba-2 causal LM (by config type). Names follow HF's without ``backbone.``."""

    # Kept in fp32 whatever the load dtype (as mamba-ssm does): exp(A_log), D and dt's bias.
    fp32_params = ("A_log", "mixer.D", "dt_bias")

    def __init__(self, cfg: MambaConfig | Mamba2Config):
        super().__init__(cfg)
        mixer_cls = Mamba2Mixer if isinstance(cfg, Mamba2Config) else MambaMixer
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MambaBlock(cfg, mixer_cls(cfg)) for _ in range(cfg.num_layers))
        self.norm = MambaRMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def set_backend(self, backend: str | None) -> "MambaLM":
        """Force the ops backend of every layer: ``"ref"``, ``"cuda"``, ``"auto"`` or None (env var)."""
        if backend is not None:
            get_ops("cpu", "ref" if backend == "cuda" else backend)  # validates the name
        for layer in self.layers:
            layer.mixer.backend = backend
        return self

    # States take the dtype of the parameters actually loaded (config.dtype names the checkpoint's).
    def state_specs(self, kv=None, dtype=None) -> list[RecurrentSpec]:
        return self.config.state_specs(None, dtype or self.dtype)

    def init_state(self, batch_size: int, max_context: int | None = None, *, kv=None, num_blocks=None,
                   device=None) -> ModelState:
        return ModelState.allocate(self.state_specs(), batch_size, max_context=max_context,
                                   device=device or self.device)

    def forward_reserved(self, input_ids: torch.Tensor, state: ModelState, last_only: bool = False) -> torch.Tensor:
        """The base loop with mamba-ssm's fused residual-add + RMSNorm between mixers (on CUDA one
        kernel per layer instead of eight, which matters for a graph-captured decode step)."""
        t = input_ids.shape[1]
        # Mamba layers read no positions or slots, so the context skips computing them. Host
        # knowledge: is every row's state still empty (a first prefill)? Then the CUDA conv and
        # Mamba-1 scan, which take no initial state, need no correction for it.
        ctx = ForwardContext(positions=None, seq_lens=None, num_new=t)
        ctx.extras["mamba_fresh"] = t > 1 and all(s.num_tokens == t for s in state.seqs)
        ops = self.layers[0].mixer.ops(input_ids.device)
        fp32 = self.config.residual_in_fp32
        hidden, residual = self.embed(input_ids), None
        for layer, layer_state in zip(self.layers, state.layers):
            h, residual = ops.add_rmsnorm(hidden, residual, layer.norm.weight, layer.norm.eps, fp32)
            hidden = layer.mixer(h, layer_state, ctx)
        if last_only:
            hidden, residual = hidden[:, -1:], residual[:, -1:]
        h, _ = ops.add_rmsnorm(hidden, residual, self.norm.weight, self.norm.eps, fp32)
        logits = self.lm_head(h)
        state.advance(t)
        return logits

    @torch.no_grad()
    def init_random(self, gen: torch.Generator) -> None:
        """mamba-ssm's initialisation of the SSM parameters (used by build_model)."""
        for layer in self.layers:
            init_ssm_params_(layer.mixer, gen)


@torch.no_grad()
def init_ssm_params_(m: nn.Module, gen: torch.Generator) -> None:
    """mamba-ssm's initialisation of a mixer's A_log, D, dt bias and conv weight, in place."""
    n = m.A_log.shape[-1] if m.A_log.dim() == 2 else m.A_log.shape[0]
    if m.A_log.dim() == 2:
        A = torch.arange(1, n + 1, dtype=torch.float32).expand_as(m.A_log)
    else:
        A = torch.rand(n, generator=gen) * 15 + 1
    m.A_log.copy_(torch.log(A))
    m.D.fill_(1.0)
    bias = m.dt_proj.bias if hasattr(m, "dt_proj") else m.dt_bias
    dt = torch.exp(torch.rand(bias.shape, generator=gen) * (math.log(0.1) - math.log(1e-3))
                   + math.log(1e-3)).clamp(min=1e-4)
    bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    k = m.conv1d.weight.shape[-1]
    m.conv1d.weight.copy_((torch.rand(m.conv1d.weight.shape, generator=gen) * 2 - 1) / math.sqrt(k))


def _convert_keys(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """HF (backbone.embeddings, norm_f) and mamba-ssm (backbone.embedding) names -> ours."""
    out = {}
    for k, v in sd.items():
        k = k[len("backbone."):] if k.startswith("backbone.") else k
        if k in ("embeddings.weight", "embedding.weight"):
            k = "embed_tokens.weight"
        elif k == "norm_f.weight":
            k = "norm.weight"
        elif k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        out[k] = v
    return out


def to_mamba_ssm(model: MambaLM) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, state dict) of ``model`` as mamba-ssm's MambaLMHeadModel: export, comparisons."""
    c = model.config
    ssm: dict[str, Any] = {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                           "bias": c.use_bias, "conv_bias": c.use_conv_bias}
    if isinstance(c, Mamba2Config):
        ssm.update(layer="Mamba2", headdim=c.head_dim, ngroups=c.n_groups, chunk_size=c.chunk_size,
                   norm_before_gate=c.norm_before_gate)
        if tuple(c.time_step_limit) != INF_LIMIT:
            ssm["dt_limit"] = tuple(c.time_step_limit)
    else:
        ssm.update(layer="Mamba1", dt_rank=c.time_step_rank)
    cfg = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_layers, "vocab_size": c.vocab_size,
           "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
           "residual_in_fp32": c.residual_in_fp32, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
           "tie_embeddings": c.tie_word_embeddings}
    names = {"embed_tokens.weight": "backbone.embedding.weight", "norm.weight": "backbone.norm_f.weight",
             "lm_head.weight": "lm_head.weight"}
    sd = {names.get(k, "backbone." + k): v for k, v in model.state_dict().items()}
    return cfg, sd


register_family(Family("mamba", MambaConfig, MambaLM, ("mamba",), MambaConfig.from_hf, _convert_keys))
register_family(Family("mamba2", Mamba2Config, MambaLM, ("mamba2",), Mamba2Config.from_hf, _convert_keys))
MODEL_TYPE_DETECTORS.append(detect_mamba_ssm)

# Shapes of state-spaces' checkpoints: vocab 50277 padded to a multiple of 8 (Mamba-1) or 16 (Mamba-2).
for _name, _d, _n in (("mamba-130m", 768, 24), ("mamba-370m", 1024, 48), ("mamba-790m", 1536, 48),
                      ("mamba-1.4b", 2048, 48), ("mamba-2.8b", 2560, 64)):
    register_preset(_name, MambaConfig(vocab_size=50280, hidden_size=_d, num_layers=_n))
for _name, _d, _n in (("mamba2-130m", 768, 24), ("mamba2-370m", 1024, 48), ("mamba2-780m", 1536, 48),
                      ("mamba2-1.3b", 2048, 48), ("mamba2-2.7b", 2560, 64)):
    register_preset(_name, Mamba2Config(vocab_size=50288, hidden_size=_d, num_layers=_n))
