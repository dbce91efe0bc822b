"""The gated (SwiGLU) MLP of Llama/Qwen/DeepSeek dense layers and shared experts: one merged
gate+up GEMM, `silu(gate) * up`, then the down projection."""
from __future__ import annotations

import torch
from torch import nn

from engine.layers.linear import Linear, MergedLinear
from engine.layers.weights import WeightTable, into, into_shard


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size], bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_gated(self.gate_up_proj(x))

    def plain_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate/up `[2I, H]`, down `[H, I]`) when both are full precision without bias (what a
        fused kernel can take in place of this module), else None."""
        gu, down = self.gate_up_proj, self.down_proj
        if gu.quant is not None or down.quant is not None or gu.bias is not None or down.bias is not None:
            return None
        return gu.weight, down.weight

    def fp8_weights(self, config) -> tuple[torch.Tensor, ...] | None:
        """(gate/up `[2I, H]`, its block scales, down `[H, I]`, its block scales) when both are FP8 in
        `config`'s blocks and activation scheme, without bias (what the FP8 decode MoE kernels can take
        in place of this module), else None."""
        gu, down = self.gate_up_proj, self.down_proj
        if gu.quant != config or down.quant != config or gu.bias is not None or down.bias is not None:
            return None
        return gu.weight, gu.weight_scale_inv, down.weight, down.weight_scale_inv

    def register_weights(self, table: WeightTable, prefix: str) -> None:
        """HF names `{prefix}.gate_proj.weight`, `.up_proj.weight`, `.down_proj.weight` (+ biases)."""
        gu = self.gate_up_proj
        params = ["weight"] + (["bias"] if gu.bias is not None else [])
        for p in params:
            for i, proj in enumerate(("gate_proj", "up_proj")):
                table.add(f"{prefix}.{proj}.{p}", into_shard(gu, i, p))
            table.add(f"{prefix}.down_proj.{p}", into(getattr(self.down_proj, p)))

