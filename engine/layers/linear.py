"""Linear layers. `MergedLinear` stacks several HF projections (q/k/v, gate/up) along the output
dimension so one GEMM computes them; `load_shard` copies one HF tensor into its slice. Tensor
parallelism will split these along their output/input dims here, not in model files.

A `Linear` built under an FP8 build scope (engine/quantization.py) holds its weight in FP8 with
`weight_scale_inv` block scales and runs engine/layers/fp8_linear.py; `quantize=False` keeps one
in full precision (MoE routers, which FP8 checkpoints ship in bf16)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import decode_gemm, skinny_gemm
from engine.layers.activation import silu_and_mul
from engine.layers.fp8_linear import fp8_linear
from engine.layers.fp8_weights import fp8_parameters
from engine.quantization import build_quantization, dequantize_blocks


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for a full-precision weight; on CUDA, a few tokens run the kernel the decode GEMM
    tuner timed fastest for this weight (cuBLAS or the skinny Triton GEMM, engine/kernels/decode_gemm.py)."""
    if x.device.type != "cuda" or x.numel() > skinny_gemm.MAX_M * x.shape[-1] or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    y = decode_gemm.run(decode_gemm.choose(x2, weight), x2, weight, None, None, False)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, quantize: bool = True,
                 dtype: torch.dtype | None = None):
        """`dtype`: hold the weight in this dtype instead of the model's (full precision only)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant = build_quantization() if quantize else None
        if self.quant is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        else:
            self.weight, self.weight_scale_inv = fp8_parameters(self.quant, out_features, in_features)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, self.quant)
        return dense_linear(x, self.weight, self.bias)

    def forward_gated(self, h: torch.Tensor) -> torch.Tensor:
        """`self(silu(gate) * up)` for `h = [gate | up]` (a SwiGLU down projection). At a few tokens on
        CUDA, where the decode GEMM tuner chose the skinny kernel for this weight, that is one launch
        reading `h` itself: no SiLU-and-mul launch, no activation tensor. An FP8 weight whose activations
        are quantized ahead of its GEMM gets SwiGLU's activation from that quantization launch, at any
        token count."""
        h2 = h.reshape(-1, h.shape[-1])
        if h.device.type == "cuda" and self.bias is None and h2.shape[0] > 0:
            if self.quant is not None:  # FP8: any size (prefill's block GEMM quantizes ahead too)
                args = (self.weight, self.weight_scale_inv, self.quant.block_size, self.quant.quantize_activations)
            elif h2.shape[0] <= skinny_gemm.MAX_M and h.dtype == self.weight.dtype:
                args = (self.weight, None, None, False)
            else:
                return self(silu_and_mul(h))
            choice = decode_gemm.choose(h2, *args)
            if decode_gemm.gated_fused(choice, args[3]):
                return decode_gemm.run(choice, h2, *args, gated=True).view(*h.shape[:-1], self.out_features)
        return self(silu_and_mul(h))

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in full precision (a dequantized copy when FP8): for derived matrices only."""
        if self.quant is None:
            return self.weight if dtype is None else self.weight.to(dtype)
        return dequantize_blocks(self.weight, self.weight_scale_inv, self.quant.block_size,
                                 dtype or torch.get_default_dtype())


class MergedLinear(Linear):
    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False):
        quant = build_quantization()
        # Online FP8 keeps a merged layer whose parts do not fall on block boundaries in full precision
        # (e.g. DeepSeek-V2-Lite's 10944-row gate/up with 128-row blocks); an FP8 checkpoint cannot.
        aligned = quant is None or all(s % quant.block_size[0] == 0 for s in out_sizes[:-1])
        super().__init__(in_features, sum(out_sizes), bias, quantize=aligned or not quant.online)
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
