"""Torch reference of the fused MoE expert computation (what `fused_moe.py`'s Triton kernels
must reproduce): for every token, the weighted sum over its top-k experts of
`down(silu(gate(x)) * up(x))`, plus the shared experts' output when given."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels.norm_act_ref import silu_and_mul


def fused_experts_ref(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_linear=None,
                      shared_output: torch.Tensor | None = None,
                      shared_weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """hidden `[T, H]`, w13 `[E, 2I, H]` (gate rows then up rows), w2 `[E, H, I]`,
    topk_weights `[T, k]` (float32), topk_ids `[T, k]` (int) → `[T, H]` in hidden's dtype.
    Ids outside `[0, E)` (e.g. -1 for experts owned by another rank) contribute nothing.
    `expert_linear(x, which, e)` (which: "w13" | "w2") replaces `F.linear(x, w[e])` (FP8 experts).
    `shared_output [T, H]` is added to the routed sum after it is rounded to hidden's dtype;
    `shared_weights` (gate/up `[2Is, H]`, down `[H, Is]`) give it as the shared experts' MLP instead."""
    if shared_weights is not None:
        shared_output = shared_mlp(hidden, *shared_weights)
    linear = expert_linear or (lambda x, which, e: F.linear(x, (w13 if which == "w13" else w2)[e]))
    num_experts = w13.shape[0]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1)
    token_idx = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(topk_ids.shape[1])
    flat_w = topk_weights.reshape(-1).float()
    for e in torch.unique(flat_ids).tolist():
        if not 0 <= e < num_experts:
            continue
        sel = flat_ids == e
        x = hidden[token_idx[sel]]
        gate, up = linear(x, "w13", e).chunk(2, dim=-1)
        y = linear(F.silu(gate) * up, "w2", e).float()
        out.index_add_(0, token_idx[sel], y * flat_w[sel, None])
    out = out.to(hidden.dtype)
    return out if shared_output is None else out + shared_output


def shared_mlp(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The shared experts as `layers/mlp.GatedMLP` computes them: merged gate/up GEMM, SiLU-and-mul, down."""
    return F.linear(silu_and_mul(F.linear(hidden, w13)), w2)
