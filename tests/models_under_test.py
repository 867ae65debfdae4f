"""Tiny random models of every family, for the invariant tests written once (test_invariants.py).

Each family adds its factories here: name -> () -> model in fp32 on the CPU.
"""

from __future__ import annotations

from typing import Callable

import constant_state as cs
from constant_state.models.config import TransformerConfig
from constant_state.models.hybrid import HybridConfig
from constant_state.models.mamba import Mamba2Config, MambaConfig
from constant_state.models.rwkv7 import RWKV7Config

TINY_LLAMA = TransformerConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                               num_kv_heads=2, dtype="float32")


def _llama(kv: str = "auto", block_size: int = 4, config=TINY_LLAMA, **kv_fields):
    def make():
        m = cs.build_model(config, dtype="float32", seed=0)
        m.kv_config = cs.KVConfig(format=kv, block_size=block_size, **kv_fields)
        return m
    return make


TINY_RWKV7 = RWKV7Config(vocab_size=96, hidden_size=128, num_layers=2, head_size=64, decay_lora=32, a_lora=32,
                         v_lora=32, gate_lora=32, dtype="float32")


def _rwkv7():
    return cs.build_model(TINY_RWKV7, dtype="float32", seed=0)


# Chunk size 8: the invariant tests' lengths (23, 5/7/11-token chunks) cross chunk boundaries.
TINY_MAMBA = MambaConfig(vocab_size=96, hidden_size=32, num_layers=2, state_size=8, dtype="float32")
TINY_MAMBA2 = Mamba2Config(vocab_size=96, hidden_size=32, num_layers=2, state_size=8, head_dim=8, n_groups=2,
                           chunk_size=8, dtype="float32")


def _mamba(cfg):
    return lambda: cs.build_model(cfg, dtype="float32", seed=0)


# Layers 1 and 2 of 3 mix with Mamba-2, layer 0 keeps attention: paged KV and recurrent state side by side.
TINY_HYBRID = HybridConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                           num_kv_heads=2, mamba_layers=[1, 2], mamba_chunk_size=8, dtype="float32")


FACTORIES: dict[str, Callable[[], object]] = {
    "llama": _llama(),
    "llama-kv-bf16": _llama("bf16"),
    "llama-kv-fp8": _llama("fp8"),
    "llama-kv-int8": _llama("int8"),
    "llama-kv-int4": _llama("int4"),
    "llama-kv-int4-g32": _llama("int4-g32"),
    # A residual window of 8 tokens: T=23 crosses two flushes.
    "llama-kv-kivi2": _llama("kivi2", residual_window=8),
    "rwkv7": _rwkv7,
    "mamba": _mamba(TINY_MAMBA),
    "mamba2": _mamba(TINY_MAMBA2),
    "hybrid": _llama(config=TINY_HYBRID),
}
