"""MoE routing against per-token brute force, and the torch expert paths against the reference."""
from __future__ import annotations


import pytest
import torch

from engine.kernels.fused_moe_ref import fused_experts_ref
from engine.layers.moe import FusedMoE, fused_experts_torch, select_experts


def _brute(logits, k, scoring, renorm, groups, topk_groups, bias, scale, group_score):
    out_w, out_ids = [], []
    for row in logits.float():
        scores = row.softmax(-1) if scoring == "softmax" else row.sigmoid()
        choice = scores + (bias if bias is not None else 0)
        e = len(row)
        size = e // groups
        if groups > 1:
            def gval(g):
                vals = sorted(choice[g * size:(g + 1) * size].tolist(), reverse=True)
                return sum(vals[:2]) if group_score == "top2sum" else vals[0]
            kept = sorted(range(groups), key=gval, reverse=True)[:topk_groups]
            allowed = [i for g in kept for i in range(g * size, (g + 1) * size)]
        else:
            allowed = list(range(e))
        ids = sorted(allowed, key=lambda i: float(choice[i]), reverse=True)[:k]
        w = torch.stack([scores[i] for i in ids])
        if renorm:
            w = w / w.sum()
        out_w.append(w * scale)
        out_ids.append(ids)
    return torch.stack(out_w), out_ids


@pytest.mark.parametrize("scoring,renorm,groups,topk_groups,use_bias,scale,gs", [
    ("softmax", False, 1, 1, False, 1.0, "max"),  # DeepSeek-V2 greedy
    ("softmax", True, 1, 1, False, 1.0, "max"),  # Qwen3-MoE
    ("softmax", False, 4, 2, False, 1.0, "max"),  # DeepSeek-V2 group_limited_greedy
    ("sigmoid", True, 4, 2, True, 2.5, "top2sum"),  # DeepSeek-V3 noaux_tc
])
def test_routing_matches_brute_force(scoring, renorm, groups, topk_groups, use_bias, scale, gs):
    torch.manual_seed(0)
    logits = torch.randn(9, 16)
    bias = torch.randn(16) * 0.3 if use_bias else None
    w, ids = select_experts(logits, 3, scoring, renorm, groups, topk_groups, bias, scale, group_score=gs)
    ref_w, ref_ids = _brute(logits, 3, scoring, renorm, groups, topk_groups, bias, scale, gs)
    for row in range(9):
        order = sorted(range(3), key=lambda j: int(ids[row, j]))
        ref_order = sorted(range(3), key=lambda j: ref_ids[row][j])
        assert [int(ids[row, j]) for j in order] == [ref_ids[row][j] for j in ref_order]
        assert torch.allclose(w[row, order], ref_w[row, ref_order], atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 3, 20])
def test_torch_expert_paths_match_the_reference(tokens):
    torch.manual_seed(1)
    e, h, i, k = 8, 32, 16, 2
    x = torch.randn(tokens, h)
    w13, w2 = torch.randn(e, 2 * i, h) * 0.1, torch.randn(e, h, i) * 0.1
    weights = torch.rand(tokens, k)
    ids = torch.randint(0, e, (tokens, k), dtype=torch.int32)
    ids[0, 1] = -1  # an expert on another rank contributes nothing
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    assert torch.allclose(fused_experts_torch(x, w13, w2, weights, ids), ref, atol=1e-5)


def test_expert_load_is_recorded_per_layer():
    from types import SimpleNamespace

    moe = FusedMoE(4, 2, 8, 4, layer_id=1)
    with torch.no_grad():
        moe.w13.normal_()
        moe.w2.normal_()
    load = torch.zeros(2, 4)
    ids = torch.tensor([[0, 1], [1, 3], [1, -1]], dtype=torch.int32)
    moe(torch.randn(3, 8), torch.ones(3, 2), ids, SimpleNamespace(expert_load=load))
    assert load[1].tolist() == [1, 3, 0, 1] and load[0].sum() == 0
