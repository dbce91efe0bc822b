"""Torch references of the fused norm and activation kernels (`norm_act.py`), computed like the
HF implementations: the residual add in the activation dtype, the RMS statistics in float32,
the normalised value rounded to the activation dtype before the weight multiplies it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of `x [..., D]` with `weight [D]`."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = x + residual` → `(rms_norm(s), s)`: the normed input of the next block and the new residual."""
    s = x + residual
    return rms_norm(s, weight, eps), s


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`x = [gate | up]` along the last dim → `silu(gate) * up`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
