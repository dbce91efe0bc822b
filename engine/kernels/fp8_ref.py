"""Torch references of the FP8 kernels (engine/kernels/fp8_gemm.py, fused_moe_fp8.py), with the
same signatures; on CPU they are the FP8 compute path itself (dequantize, then matmul in float32).

Block format (engine/quantization.py): weight `[N, K]` float8_e4m3fn, scales float32
`[ceil(N/bn), ceil(K/bk)]`; activations quantized per token and per `bk` columns, scales
`[M, ceil(K/bk)]`. With `quantize_activations=False` only the weights are quantized.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels.fused_moe_ref import fused_experts_ref
from engine.kernels.norm_act_ref import silu_and_mul
from engine.quantization import FP8_DTYPE, FP8_MAX, dequantize_blocks


def quantize_activation_ref(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[M, K]` → (FP8 `[M, K]`, float32 scales `[M, ceil(K/group)]`): each token's `group`
    columns share one scale, their absolute maximum mapping to the largest FP8 value."""
    m, k = x.shape
    g = -(-k // group)
    padded = F.pad(x.float(), (0, g * group - k)).view(m, g, group)
    scale = (padded.abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)
    q = (padded / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, g * group)[:, :k]
    return q.to(FP8_DTYPE), scale


def dequantize_activation_ref(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    k = q.shape[1]
    return q.float() * scale.repeat_interleave(group, dim=1)[:, :k]


def fp8_block_gemm_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       block_size: tuple[int, int], quantize_activations: bool = True) -> torch.Tensor:
    """x `[M, K]` @ dequant(weight `[N, K]`)^T → `[M, N]` in x's dtype."""
    if quantize_activations:
        xf = dequantize_activation_ref(*quantize_activation_ref(x, block_size[1]), block_size[1])
    else:
        xf = x.float()
    return (xf @ dequantize_blocks(weight, weight_scale, block_size).t()).to(x.dtype)


def fused_experts_fp8_ref(hidden: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                          w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          block_size: tuple[int, int], quantize_activations: bool = True,
                          shared_output: torch.Tensor | None = None,
                          shared_weights: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """`fused_moe_ref.fused_experts_ref` with block-scaled FP8 experts: w13 `[E, 2I, H]`, w2
    `[E, H, I]` FP8 with scales `[E, ceil(2I/bn), ceil(H/bk)]`, `[E, ceil(H/bn), ceil(I/bk)]`.
    Only the selected experts are dequantized, one at a time. The shared experts, when given as
    weights, are FP8 too (gate/up `[2Is, H]`, its scales, down `[H, Is]`, its scales) and computed
    as a `GatedMLP` of FP8 linears computes them (`shared_mlp_fp8`)."""
    scales = {"w13": w13_scale, "w2": w2_scale}

    def expert_linear(x, which, e):
        w = w13 if which == "w13" else w2
        return fp8_block_gemm_ref(x, w[e], scales[which][e], block_size, quantize_activations)
    if shared_weights is not None:
        shared_output = shared_mlp_fp8(hidden, *shared_weights, block_size, quantize_activations)
    return fused_experts_ref(hidden, w13, w2, topk_weights, topk_ids, expert_linear, shared_output=shared_output)


def shared_mlp_fp8(hidden: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                   w2_scale: torch.Tensor, block_size: tuple[int, int], quantize_activations: bool = True
                   ) -> torch.Tensor:
    """`fused_moe_ref.shared_mlp` with FP8 block-scaled weights: merged gate/up, SiLU-and-mul, down."""
    gate_up = fp8_block_gemm_ref(hidden, w13, w13_scale, block_size, quantize_activations)
    return fp8_block_gemm_ref(silu_and_mul(gate_up), w2, w2_scale, block_size, quantize_activations)
