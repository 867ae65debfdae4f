"""Tiny random RWKV-7 checkpoints in BlinkDL's .pth format (the rwkv package's) and fla-hub names."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab=97, c=128, layers=2, head=64, ffn=512, lora=32)


def blinkdl_state_dict(seed: int = 0, vocab=TINY["vocab"], c=TINY["c"], layers=TINY["layers"], head=TINY["head"],
                       ffn=TINY["ffn"], lora=TINY["lora"]) -> dict[str, torch.Tensor]:
    """A random x070 state dict with the shapes BlinkDL's trainer saves ([1, 1, C] lerps, [H, N] r_k),
    values in the ranges of trained models so that every term matters."""
    g = torch.Generator().manual_seed(seed)

    def u(*shape, lo=0.0, hi=1.0):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    def n(*shape, scale=1.0):
        return torch.randn(shape, generator=g) * scale

    sd = {"emb.weight": n(vocab, c), "blocks.0.ln0.weight": u(c, lo=0.7, hi=1.3),
          "blocks.0.ln0.bias": u(c, lo=-.1, hi=.1)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "ln1.weight"], sd[p + "ln1.bias"] = u(c, lo=0.7, hi=1.3), u(c, lo=-.1, hi=.1)
        sd[p + "ln2.weight"], sd[p + "ln2.bias"] = u(c, lo=0.7, hi=1.3), u(c, lo=-.1, hi=.1)
        for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[p + "att." + x] = u(1, 1, c)
        sd[p + "att.w0"] = u(1, 1, c, lo=-6.0, hi=1.0)
        sd[p + "att.a0"] = u(1, 1, c, lo=-.5, hi=.5)
        sd[p + "att.v0"] = u(1, 1, c)  # layer 0's v0/v1/v2 exist in trained checkpoints, unused
        for a_, b_ in (("w1", "w2"), ("a1", "a2"), ("v1", "v2"), ("g1", "g2")):
            sd[p + "att." + a_], sd[p + "att." + b_] = n(c, lora, scale=c ** -.5), n(lora, c, scale=lora ** -.5)
        sd[p + "att.k_k"] = u(1, 1, c, lo=0.6, hi=1.0)
        sd[p + "att.k_a"] = u(1, 1, c, lo=0.8, hi=1.2)
        sd[p + "att.r_k"] = u(c // head, head, lo=-.1, hi=.1)
        for lin in ("receptance", "key", "value", "output"):
            sd[p + f"att.{lin}.weight"] = n(c, c, scale=c ** -.5)
        sd[p + "att.ln_x.weight"], sd[p + "att.ln_x.bias"] = u(c, lo=0.7, hi=1.3), u(c, lo=-.1, hi=.1)
        sd[p + "ffn.x_k"] = u(1, 1, c)
        sd[p + "ffn.key.weight"] = n(ffn, c, scale=c ** -.5)
        sd[p + "ffn.value.weight"] = n(c, ffn, scale=ffn ** -.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = u(c, lo=0.7, hi=1.3), u(c, lo=-.1, hi=.1)
    sd["head.weight"] = n(vocab, c, scale=c ** -.5)
    return sd


def save_blinkdl(tmp_path: Path, seed: int = 0, **shape) -> Path:
    path = tmp_path / "rwkv7-tiny.pth"
    torch.save(blinkdl_state_dict(seed, **shape), path)
    return path


def blinkdl_to_fla(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under fla-hub's names (fla.models.RWKV7ForCausalLM), as its code defines them."""
    out = {"model.embeddings.weight": sd["emb.weight"], "model.norm.weight": sd["ln_out.weight"],
           "model.norm.bias": sd["ln_out.bias"], "lm_head.weight": sd["head.weight"],
           "model.layers.0.pre_norm.weight": sd["blocks.0.ln0.weight"],
           "model.layers.0.pre_norm.bias": sd["blocks.0.ln0.bias"]}
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(layers):
        b, f = f"blocks.{i}.", f"model.layers.{i}."
        for ours, theirs in (("ln1", "attn_norm"), ("ln2", "ffn_norm")):
            out[f + theirs + ".weight"], out[f + theirs + ".bias"] = sd[b + ours + ".weight"], sd[b + ours + ".bias"]
        for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            out[f + "attn." + x] = sd[b + "att." + x]
        out[f + "attn.k_k"], out[f + "attn.k_a"] = sd[b + "att.k_k"].flatten(), sd[b + "att.k_a"].flatten()
        out[f + "attn.r_k"] = sd[b + "att.r_k"]
        for lin, proj in (("receptance", "r"), ("key", "k"), ("value", "v"), ("output", "o")):
            out[f + f"attn.{proj}_proj.weight"] = sd[b + f"att.{lin}.weight"]
        for name, (bias, down, up) in {"w_lora": ("w0", "w1", "w2"), "a_lora": ("a0", "a1", "a2"),
                                       "v_lora": ("v0", "v1", "v2"), "g_lora": (None, "g1", "g2")}.items():
            if name == "v_lora" and i == 0:
                continue
            out[f + f"attn.{name}.lora.0.weight"] = sd[b + "att." + down].t().contiguous()
            out[f + f"attn.{name}.lora.2.weight"] = sd[b + "att." + up].t().contiguous()
            if bias:
                out[f + f"attn.{name}.lora.2.bias"] = sd[b + "att." + bias].flatten()
        out[f + "attn.g_norm.weight"], out[f + "attn.g_norm.bias"] = sd[b + "att.ln_x.weight"], sd[b + "att.ln_x.bias"]
        out[f + "ffn.x_k"] = sd[b + "ffn.x_k"].flatten()
        out[f + "ffn.key.weight"], out[f + "ffn.value.weight"] = sd[b + "ffn.key.weight"], sd[b + "ffn.value.weight"]
    return out
