"""Imports every model module so that each registers its family (and presets)."""

from . import transformer  # noqa: F401
