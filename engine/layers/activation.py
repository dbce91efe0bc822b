"""Activations on merged projections (`x = [gate | up]` → `silu(gate) * up`); the kernel choice is
`fused_ops.py`'s."""
from __future__ import annotations

from engine.layers.fused_ops import silu_and_mul

__all__ = ["silu_and_mul"]
