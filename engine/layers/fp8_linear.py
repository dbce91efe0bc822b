"""FP8 compute for layers whose weights are block-scaled FP8 (engine/quantization.py): the one
place that picks the kernel — Triton on CUDA, the torch reference (dequantize, then matmul) on
CPU — for linear layers (`fp8_linear`) and MoE experts (`fp8_experts`)."""
from __future__ import annotations

import torch

from engine.kernels.fp8_ref import fp8_block_gemm_ref, fused_experts_fp8_ref
from engine.quantization import Fp8Config


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               config: Fp8Config) -> torch.Tensor:
    """`F.linear` with an FP8 weight `[N, K]` and its block scales; x `[..., K]` in the compute dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x.device.type == "cuda":
        from engine.kernels import decode_gemm
        args = (weight, weight_scale, config.block_size, config.quantize_activations)
        y = decode_gemm.run(decode_gemm.choose(x2, *args), x2, *args)
    else:
        y = fp8_block_gemm_ref(x2, weight, weight_scale, config.block_size, config.quantize_activations)
    if bias is not None:
        y = y + bias
    return y.view(*lead, weight.shape[0])


def fp8_experts(hidden: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                config: Fp8Config, shared=None) -> torch.Tensor:
    """The fused MoE expert computation over FP8 experts (`fused_moe_ref.fused_experts_ref`'s contract),
    plus the output of `shared` (the shared experts' `GatedMLP`) when given. On CUDA at decode sizes
    (`moe_decode.MAX_TOKENS`) the two decode kernels compute the shared experts too, from their FP8
    weights when they are in the experts' blocks; above, the module runs its own (tuned) GEMMs."""
    args = (hidden, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, config.block_size,
            config.quantize_activations)
    if hidden.device.type != "cuda":
        return fused_experts_fp8_ref(*args, shared_output=None if shared is None else shared(hidden))
    from engine.kernels.fused_moe_fp8 import fused_experts_fp8
    from engine.kernels.moe_decode import MAX_TOKENS
    weights = shared.fp8_weights(config) if shared is not None and hidden.shape[0] <= MAX_TOKENS else None
    shared_output = shared(hidden) if shared is not None and weights is None else None
    return fused_experts_fp8(*args, shared_output=shared_output, shared_weights=weights)
