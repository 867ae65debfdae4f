"""constant_state: paged/quantized KV caches beside constant-size recurrent states, one interface."""

from .cache.block_pool import KVCacheFullError
from .cache.config import KVConfig
from .generate import SamplingConfig, generate
from .models.hf import build_model, load, resolve_config, save_checkpoint
from .state import ModelState, PagedKVSpec, RecurrentSpec, StateSpec, TensorSpec

__version__ = "0.1.0"

__all__ = ["load", "build_model", "resolve_config", "save_checkpoint", "generate", "SamplingConfig", "KVConfig", "KVCacheFullError",
           "ModelState", "StateSpec", "RecurrentSpec", "PagedKVSpec", "TensorSpec", "__version__"]
