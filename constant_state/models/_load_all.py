"""Imports every model module so that each registers its family (and presets)."""

from . import transformer  # noqa: F401
from . import rwkv7  # noqa: F401
from . import mamba  # noqa: F401
from . import hybrid  # noqa: F401
