"""DeepSeek-V2 / V3: MLA attention (engine/layers/mla.py) and DeepSeekMoE — routed experts plus
always-on shared experts, the first `first_k_dense_replace` layers dense. Routing: V2 softmax
greedy (or group-limited), V3 sigmoid grouped top-k with `e_score_correction_bias`;
`routed_scaling_factor` scales the routed output. V3's multi-token-prediction layer weights
(`model.layers.{num_hidden_layers}.*`) are skipped until speculative decoding uses them.
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from engine.forward_batch import ForwardBatch
from engine.layers.linear import Linear
from engine.layers.mla import MLAttention
from engine.layers.mlp import GatedMLP
from engine.layers.moe import FusedMoE, router_logits, select_experts
from engine.layers.rotary import RotaryEmbedding
from engine.layers.weights import WeightTable, into
from engine.models.llama import CausalLM, skip_buffers

log = logging.getLogger(__name__)


class DeepseekMoE(nn.Module):
    needs_batch = True

    def __init__(self, hf: dict, layer_id: int, parallel):
        super().__init__()
        self.hf = hf
        num_experts = hf["n_routed_experts"]
        self.top_k = hf["num_experts_per_tok"]
        v3 = "DeepseekV3ForCausalLM" in (hf.get("architectures") or [])
        self.method = hf.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        # The router runs in fp32 (as HF computes it); holding its weight in fp32 saves a cast of the
        # whole [experts, hidden] matrix in every MoE layer of every step.
        self.gate = Linear(hf["hidden_size"], num_experts, quantize=False, dtype=torch.float32)
        self.e_score_correction_bias = (nn.Parameter(torch.zeros(num_experts, dtype=torch.float32))
                                        if self.method == "noaux_tc" else None)
        self.experts = FusedMoE(num_experts, self.top_k, hf["hidden_size"], hf["moe_intermediate_size"],
                                layer_id, parallel)
        shared = hf.get("n_shared_experts") or 0
        self.shared_experts = GatedMLP(hf["hidden_size"], hf["moe_intermediate_size"] * shared) if shared else None

    def route(self, hidden: torch.Tensor):
        hf = self.hf
        logits = router_logits(hidden, self.gate.weight)
        scale = float(hf.get("routed_scaling_factor", 1.0) or 1.0)
        if self.method == "noaux_tc":
            return select_experts(logits, self.top_k, hf.get("scoring_func", "sigmoid"),
                                  renormalize=bool(hf.get("norm_topk_prob", True)), num_groups=hf.get("n_group") or 1,
                                  topk_groups=hf.get("topk_group") or 1, correction_bias=self.e_score_correction_bias,
                                  routed_scaling_factor=scale, group_score="top2sum")
        groups = hf.get("n_group") or 1 if self.method == "group_limited_greedy" else 1
        renorm = bool(hf.get("norm_topk_prob", False)) and self.top_k > 1
        return select_experts(logits, self.top_k, "softmax", renormalize=renorm, num_groups=groups,
                              topk_groups=hf.get("topk_group") or 1, routed_scaling_factor=1.0 if renorm else scale)

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        weights, ids = self.route(hidden)
        # The routed experts' kernels add the shared experts (at decode sizes, compute them too).
        return self.experts(hidden, weights, ids, batch, shared=self.shared_experts)

    def register_weights(self, table: WeightTable, prefix: str) -> None:
        table.add(f"{prefix}.gate.weight", into(self.gate.weight))
        if self.e_score_correction_bias is not None:
            table.add(f"{prefix}.gate.e_score_correction_bias", into(self.e_score_correction_bias))
        self.experts.register_weights(table, f"{prefix}.experts")
        if self.shared_experts is not None:
            self.shared_experts.register_weights(table, f"{prefix}.shared_experts")


class DeepseekV2ForCausalLM(CausalLM):
    def build_rope(self) -> nn.Module:
        hf = self.config.hf
        return RotaryEmbedding(hf["qk_rope_head_dim"], self.config.max_model_len, hf,
                               interleaved=bool(hf.get("rope_interleave", True)))

    def build_attention(self, i: int) -> nn.Module:
        return MLAttention(self.config.hf, i, self.rope)

    def build_mlp(self, i: int) -> nn.Module:
        hf = self.config.hf
        moe = (hf.get("n_routed_experts") and i >= (hf.get("first_k_dense_replace") or 0)
               and i % (hf.get("moe_layer_freq") or 1) == 0)
        if moe:
            return DeepseekMoE(hf, i, self.parallel)
        return GatedMLP(hf["hidden_size"], hf["intermediate_size"])

    def skip_weight(self, name: str) -> bool:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= self.config.num_layers:
            return True  # multi-token-prediction layer(s)
        return skip_buffers(name)

    def process_weights_after_loading(self) -> None:
        for layer in self.layers:
            layer.self_attn.process_weights_after_loading()


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    pass
