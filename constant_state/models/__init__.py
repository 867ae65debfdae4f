"""Model families. Importing this package registers every family and its presets."""

from . import _load_all  # noqa: F401
