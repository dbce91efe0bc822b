"""Linear layers. `MergedLinear` stacks several HF projections (q/k/v, gate/up) along the output
dimension so one GEMM computes them; `load_shard` copies one HF tensor into its slice. Tensor
parallelism will split these along their output/input dims here, not in model files."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False):
        super().__init__(in_features, sum(out_sizes), bias)
        self.out_sizes = list(out_sizes)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]

    def load_shard(self, index: int, tensor: torch.Tensor, param: str = "weight") -> None:
        target = getattr(self, param)
        start, size = self.offsets[index], self.out_sizes[index]
        dst = target.data[start: start + size]
        if tuple(tensor.shape) != tuple(dst.shape):
            raise ValueError(f"shard {index} of {param}: expected shape {tuple(dst.shape)}, got {tuple(tensor.shape)}")
        dst.copy_(tensor)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split(self.out_sizes, dim=-1))
