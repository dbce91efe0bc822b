"""RMSNorm, computed in float32 like the HF reference implementations (fused kernel on CUDA,
torch elsewhere: see `fused_ops.py`)."""
from __future__ import annotations

import torch
from torch import nn

from engine.layers import fused_ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`, computes `norm(x + residual)` and also returns the new residual."""
        if residual is None:
            return fused_ops.rms_norm(x, self.weight, self.eps)
        return fused_ops.add_rms_norm(x, residual, self.weight, self.eps)
