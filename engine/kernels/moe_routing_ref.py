"""Torch references of the MoE routing and expert-alignment kernels (`moe_routing.py`).

`select_experts` turns router logits into each token's top-k experts and weights:
* `softmax` top-k (Qwen3-MoE, DeepSeek-V2 `greedy`), optionally renormalised;
* `softmax` group-limited (DeepSeek-V2 `group_limited_greedy`: groups ranked by their best expert);
* `sigmoid` grouped with a correction bias (DeepSeek-V3 `noaux_tc`: the bias only steers the
  choice; groups ranked by the sum of their two best biased scores; weights are the unbiased
  scores, renormalised, times `routed_scaling_factor`).

`align_by_expert` groups the token-expert slots by expert into blocks for the grouped GEMM of
`fused_moe.py`. Both are device ops only (no host sync, shapes depend on T only).
"""
from __future__ import annotations

import torch


def router_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden `[T, H]` (activation dtype), router weight `[E, H]` (held in float32) → `[T, E]` float32
    logits, computed in float32 as HF's DeepSeek and Qwen3-MoE routers compute them."""
    return torch.nn.functional.linear(hidden.float(), weight.float())


def select_experts(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = False,
                   num_groups: int = 1, topk_groups: int = 1, correction_bias: torch.Tensor | None = None,
                   routed_scaling_factor: float = 1.0, group_score: str = "max"):
    """router_logits `[T, E]` → (topk_weights `[T, k]` float32, topk_ids `[T, k]` int32)."""
    logits = router_logits.float()
    if scoring == "softmax":
        scores = logits.softmax(dim=-1)
    elif scoring == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"unknown MoE scoring function {scoring!r}")
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if num_groups > 1:
        t, e = choice.shape
        grouped = choice.view(t, num_groups, e // num_groups)
        if group_score == "top2sum":
            gscore = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            gscore = grouped.max(dim=-1).values
        keep = torch.zeros_like(gscore).scatter_(1, gscore.topk(topk_groups, dim=-1).indices, 1.0)
        mask = keep.unsqueeze(-1).expand_as(grouped).reshape(t, e).bool()
        fill = float("-inf") if correction_bias is not None else 0.0
        choice = choice.masked_fill(~mask, fill)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """→ (sorted_slots [P] int32 with padding = T*k, block_expert [P/block_m] int32 with -1 = unused).

    Slot `t*k + j` is token t's j-th choice; each expert's slots (in slot order) start a fresh
    block of `block_m`; ids outside `[0, E)` are dropped. P is the worst case over all routings."""
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    valid = (flat >= 0) & (flat < num_experts)
    bucket = torch.where(valid, flat, torch.full_like(flat, num_experts))
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    first = counts.cumsum(0) - counts
    order = torch.sort(bucket, stable=True).indices
    sorted_bucket = bucket[order]
    ok = sorted_bucket < num_experts
    e = sorted_bucket.clamp(max=num_experts - 1)
    rank = torch.arange(n, device=flat.device) - first[e]
    max_padded = padded_slots(n, num_experts, block_m)
    dest = torch.where(ok, starts[e] + rank, torch.full_like(rank, max_padded))
    sorted_slots = torch.full((max_padded + 1,), n, dtype=torch.int32, device=flat.device)
    sorted_slots.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, max_padded, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_slots[:max_padded], block_expert


def padded_slots(num_slots: int, num_experts: int, block_m: int) -> int:
    """Worst-case length of the aligned slot list: every expert's last block partly padding."""
    p = num_slots + num_experts * (block_m - 1)
    return (p + block_m - 1) // block_m * block_m
