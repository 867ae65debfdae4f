"""Distillation of a Transformer's attention layers into Mamba layers (hybrid models).

The hybrid model it produces is :mod:`constant_state.models.hybrid`.
"""
