"""Qwen3-MoE: Qwen3 attention (QK-norm) with sparse MoE MLPs (softmax top-k routing, optional
renormalisation, no shared expert); `decoder_sparse_step` / `mlp_only_layers` keep some dense."""
from __future__ import annotations

import torch
from torch import nn

from engine.forward_batch import ForwardBatch
from engine.layers.linear import Linear
from engine.layers.mlp import GatedMLP
from engine.layers.moe import FusedMoE, router_logits, select_experts
from engine.layers.weights import WeightTable, into
from engine.models.llama import Qwen3ForCausalLM


class Qwen3SparseMoE(nn.Module):
    needs_batch = True

    def __init__(self, hf: dict, layer_id: int, parallel):
        super().__init__()
        self.top_k = hf["num_experts_per_tok"]
        self.renormalize = bool(hf.get("norm_topk_prob", True))
        num_experts = hf.get("num_experts") or hf["num_local_experts"]  # transformers 5 renamed it
        # The router runs in fp32 (as HF computes it); holding its weight in fp32 saves a cast of the
        # whole [experts, hidden] matrix in every MoE layer of every step.
        self.gate = Linear(hf["hidden_size"], num_experts, quantize=False, dtype=torch.float32)
        self.experts = FusedMoE(num_experts, self.top_k, hf["hidden_size"], hf["moe_intermediate_size"],
                                layer_id, parallel)

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        logits = router_logits(hidden, self.gate.weight)
        weights, ids = select_experts(logits, self.top_k, "softmax", renormalize=self.renormalize)
        return self.experts(hidden, weights, ids, batch)

    def register_weights(self, table: WeightTable, prefix: str) -> None:
        table.add(f"{prefix}.gate.weight", into(self.gate.weight))
        self.experts.register_weights(table, f"{prefix}.experts")


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def build_mlp(self, i: int) -> nn.Module:
        hf = self.config.hf
        step = hf.get("decoder_sparse_step", 1) or 1
        dense = i in (hf.get("mlp_only_layers") or []) or (i + 1) % step != 0
        if dense:
            return GatedMLP(hf["hidden_size"], hf["intermediate_size"])
        return Qwen3SparseMoE(hf, i, self.parallel)
