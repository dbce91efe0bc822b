"""Rotary position embeddings: plain RoPE, Llama-3 frequency scaling and YaRN (DeepSeek-V2/V3),
in neox (rotate-half) or interleaved-pair layout. cos/sin tables are precomputed once up to
`max_position` so the forward pass is a gather (CUDA-graph friendly).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine.kernels.rope_kv_ref import apply_rope
from engine.rope_config import rope_parameters


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_scale(hf: dict[str, Any], head_dim: int) -> float:
    """DeepSeek's attention scale: `head_dim**-0.5`, corrected by YaRN's `mscale_all_dim`**2."""
    scale = head_dim ** -0.5
    p = rope_parameters(hf)
    if p["rope_type"] == "yarn":
        m = yarn_get_mscale(p.get("factor", 1.0), p.get("mscale_all_dim", 0.0) or 0.0)
        scale = scale * m * m
    return scale


def _inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled)


def _yarn_inv_freq(dim: int, theta: float, p: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor = p["factor"]
    old_ctx = p.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = p.get("beta_fast", 32), p.get("beta_slow", 1)

    def correction_dim(num_rot: float) -> float:
        return (dim * math.log(old_ctx / (num_rot * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extra = _inv_freq(dim, theta)
    inter = extra / factor
    mask = 1 - ramp  # 1 → keep extrapolated frequency
    inv_freq = inter * (1 - mask) + extra * mask
    mscale = yarn_get_mscale(factor, p.get("mscale", 1.0)) / yarn_get_mscale(factor, p.get("mscale_all_dim", 0.0) or 0.0)
    return inv_freq, mscale


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, max_position: int, hf: dict[str, Any], interleaved: bool = False):
        super().__init__()
        p = rope_parameters(hf)
        theta = float(p["rope_theta"])
        kind = p["rope_type"]
        mscale = 1.0
        if kind == "default":
            inv_freq = _inv_freq(rotary_dim, theta)
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(_inv_freq(rotary_dim, theta), p)
        elif kind == "yarn":
            inv_freq, mscale = _yarn_inv_freq(rotary_dim, theta, p)
        else:
            raise ValueError(f"unsupported rope_type {kind!r} (supported: default, llama3, yarn)")
        t = torch.arange(max_position, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)  # [max_pos, dim/2]
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        self.register_buffer("cos", (freqs.cos() * mscale).float(), persistent=False)
        self.register_buffer("sin", (freqs.sin() * mscale).float(), persistent=False)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate `x [T, H, rotary_dim]` (or `[T, rotary_dim]`) at `positions [T]`."""
        return apply_rope(x, positions, self.cos, self.sin, self.interleaved)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self.rotate(q, positions), self.rotate(k, positions)
