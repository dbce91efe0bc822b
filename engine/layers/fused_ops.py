"""The one place layers choose between the fused Triton kernels and their torch references:
Triton on CUDA tensors, torch everywhere else (CPU runs and CI take the reference path, which is
also what the kernels are tested against). Every op here is CUDA-graph safe on both paths.

Layers call these functions, never the kernel modules: norms (`RMSNorm`), the gated MLP, the GQA
prologue (q/k norm + rotary + KV write), MLA's cached entry and MoE routing (logits and top-k).
"""
from __future__ import annotations

import torch

from engine.kernels import kv_write_ref, moe_routing_ref, norm_act_ref, rope_kv_ref


def _fused(x: torch.Tensor) -> bool:
    return x.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _fused(x):
        from engine.kernels import norm_act
        return norm_act.rms_norm(x, weight, eps)
    return norm_act_ref.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(x + residual), x + residual)`."""
    if _fused(x):
        from engine.kernels import norm_act
        return norm_act.add_rms_norm(x, residual, weight, eps)
    return norm_act_ref.add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _fused(x):
        from engine.kernels import norm_act
        return norm_act.silu_and_mul(x)
    return norm_act_ref.silu_and_mul(x)


def qk_norm_rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                          interleaved: bool = False):
    """Merged QKV `[T, (Hq + 2 Hkv) D]` → (q, k, v) `[T, H, D]`, q and k normed (if weights) and
    rotated, k and v written into the paged pool `kv_cache`."""
    d = kv_cache.shape[-1]
    if _fused(qkv) and cos.shape[-1] * 2 == d and d & (d - 1) == 0:
        from engine.kernels import rope_kv
        impl = rope_kv.qk_norm_rope_write_kv
    else:  # CPU, or partial rotary / odd head sizes the kernel does not take
        impl = rope_kv_ref.qk_norm_rope_write_kv
    return impl(qkv, positions, cos, sin, q_norm, k_norm, eps, kv_cache, slot_mapping, num_heads, num_kv_heads,
                interleaved)


def mla_kv_entry(kv_a: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 norm_weight: torch.Tensor, eps: float, interleaved: bool = True, kv_cache: torch.Tensor | None = None,
                 slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
    """MLA's `kv_a_proj_with_mqa` output `[T, R + P]` → the cached entry: normed latent ++ rotated rope
    key; with `kv_cache`, also written into the pool at `slot_mapping` (in the same kernel when the
    pool holds the entry's dtype; an FP8 pool takes the KV-write kernel's rounding)."""
    impl = rope_kv_ref.mla_kv_entry
    if _fused(kv_a) and (cos.shape[-1] & (cos.shape[-1] - 1)) == 0:
        from engine.kernels import rope_kv
        impl = rope_kv.mla_kv_entry
        if kv_cache is not None and kv_cache.dtype != torch.promote_types(kv_a.dtype, norm_weight.dtype):
            entry = impl(kv_a, positions, cos, sin, norm_weight, eps, interleaved)
            write_kv(kv_cache, 0, entry.unsqueeze(1), slot_mapping)
            return entry
    return impl(kv_a, positions, cos, sin, norm_weight, eps, interleaved, kv_cache, slot_mapping)


def write_kv(kv_cache: torch.Tensor, component: int, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter `values [T, H, D]` into the paged pool's `component` at flat slots (slot -1 skipped);
    the torch form masks with a boolean index, which syncs with the host."""
    if _fused(values):
        from engine.kernels import paged_attention
        return paged_attention.write_kv(kv_cache, component, values, slot_mapping)
    return kv_write_ref.write_kv(kv_cache, component, values, slot_mapping)


def mla_query(q_latent: torch.Tensor, q: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """MLA's absorbed query: `q_latent [T, H, R]` ++ the rotated last P channels of `q [T, H, nope + P]`."""
    impl = rope_kv_ref.mla_query
    if _fused(q) and (cos.shape[-1] & (cos.shape[-1] - 1)) == 0:
        from engine.kernels import rope_kv
        impl = rope_kv.mla_query
    return impl(q_latent, q, positions, cos, sin, interleaved)


def mla_absorbed_query(q: torch.Tensor, w_uk: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """MLA's absorbed decode query `[T, H, R + P]`: `q [T, H, nope + P]`'s no-rope part times `w_uk
    [H, nope, R]` ++ its rotated rope part; one kernel at decode sizes, else the batched GEMM + `mla_query`."""
    if _fused(q) and (cos.shape[-1] & (cos.shape[-1] - 1)) == 0 and w_uk.dtype == q.dtype:
        from engine.kernels import rope_kv
        if q.shape[0] <= rope_kv.ABSORB_MAX_TOKENS:
            return rope_kv.mla_absorbed_query(q, w_uk, positions, cos, sin, interleaved)
    nope = w_uk.shape[1]
    q_latent = torch.bmm(q[..., :nope].transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, R]
    return mla_query(q_latent, q, positions, cos, sin, interleaved)


def router_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden `[T, H]` @ the float32 router weight `[E, H]`^T in float32 → logits `[T, E]`."""
    if _fused(hidden):
        from engine.kernels import moe_routing
        return moe_routing.router_logits(hidden, weight)
    return moe_routing_ref.router_logits(hidden, weight)


def select_experts(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = False,
                   num_groups: int = 1, topk_groups: int = 1, correction_bias: torch.Tensor | None = None,
                   routed_scaling_factor: float = 1.0, group_score: str = "max"):
    """router_logits `[T, E]` → (topk_weights `[T, k]` float32, topk_ids `[T, k]` int32); see
    `engine/kernels/moe_routing_ref.py` for the routing methods."""
    impl = moe_routing_ref.select_experts
    if _fused(router_logits):
        from engine.kernels import moe_routing
        impl = moe_routing.select_experts
    return impl(router_logits, top_k, scoring, renormalize, num_groups, topk_groups, correction_bias,
                routed_scaling_factor, group_score)
