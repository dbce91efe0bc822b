"""Roofline floors from a model config: bytes a decode step must move and FLOPs a prefill must do.

Pure arithmetic on the HF config (no torch model needed), so it runs anywhere. Floors are lower
bounds on time given a measured HBM bandwidth and matmul rate:
* decode step: weights read once per step (for MoE, only the experts the batch touches — an
  estimate assuming uniform routing: E·(1 − (1 − k/E)^B) distinct experts per layer) plus the
  KV cache every sequence reads;
* prefill: 2 FLOPs per active parameter per token plus causal attention FLOPs.
Embedding tables are gathered, not read, so they count in neither.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.config import ModelConfig


@dataclass
class ParamCounts:
    dense: int  # always read per step: attention, norms, dense MLPs, shared experts, routers, lm_head
    per_expert: int  # one routed expert's parameters
    moe_layers: int
    num_experts: int
    top_k: int
    embedding: int

    @property
    def total(self) -> int:
        return self.dense + self.per_expert * self.moe_layers * self.num_experts + self.embedding

    @property
    def active_per_token(self) -> int:
        return self.dense + self.per_expert * self.moe_layers * self.top_k


def _attn_params(mc: ModelConfig) -> int:
    hf, h = mc.hf, mc.hidden_size
    if mc.is_mla:
        nh, dn, dr, dv, r = mc.num_heads, hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"], hf["kv_lora_rank"]
        q = hf.get("q_lora_rank")
        q_params = (h * q + q + q * nh * (dn + dr)) if q else h * nh * (dn + dr)
        return q_params + h * (r + dr) + r + r * nh * (dn + dv) + nh * dv * h
    d = mc.head_dim
    norms = 2 * d if mc.architecture.startswith("Qwen3") else 0
    return h * d * (mc.num_heads + 2 * mc.num_kv_heads) + mc.num_heads * d * h + norms


def param_counts(mc: ModelConfig) -> ParamCounts:
    hf, h, layers = mc.hf, mc.hidden_size, mc.num_layers
    mlp = lambda inter: 3 * h * inter  # noqa: E731
    dense = layers * (_attn_params(mc) + 2 * h) + h + mc.vocab_size * h  # + final norm + lm_head
    embedding = 0 if mc.tie_word_embeddings else mc.vocab_size * h  # a tied table is counted as lm_head
    moe_layers, num_experts, top_k, per_expert = 0, 0, 0, 0
    if mc.is_moe:
        if mc.is_mla:
            num_experts = hf["n_routed_experts"]
            first, freq = hf.get("first_k_dense_replace") or 0, hf.get("moe_layer_freq") or 1
            moe_ids = [i for i in range(layers) if i >= first and i % freq == 0]
            shared = mlp(hf["moe_intermediate_size"] * (hf.get("n_shared_experts") or 0))
            if mc.architecture == "DeepseekV3ForCausalLM" or hf.get("topk_method") == "noaux_tc":
                shared += num_experts  # e_score_correction_bias
        else:
            num_experts = hf.get("num_experts") or hf["num_local_experts"]
            step = hf.get("decoder_sparse_step", 1) or 1
            only = set(hf.get("mlp_only_layers") or [])
            moe_ids = [i for i in range(layers) if i not in only and (i + 1) % step == 0]
            shared = 0
        moe_layers = len(moe_ids)
        top_k = hf["num_experts_per_tok"]
        per_expert = mlp(hf["moe_intermediate_size"])
        dense += moe_layers * (shared + num_experts * h) + (layers - moe_layers) * mlp(hf["intermediate_size"])
    else:
        dense += layers * mlp(hf["intermediate_size"])
    return ParamCounts(dense, per_expert, moe_layers, num_experts, top_k, embedding)


def experts_touched(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts per layer for `batch` tokens under uniform routing."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def decode_step_bytes(mc: ModelConfig, batch: int, context: int, dtype_bytes: int = 2,
                      fp8_weights: bool = False) -> dict:
    """`fp8_weights`: projections and experts at 1 byte a parameter, the LM head still `dtype_bytes`
    (block scales, norms and routers are under 0.1 % of the bytes and left out)."""
    pc = param_counts(mc)
    weights = (pc.dense + pc.per_expert * pc.moe_layers * experts_touched(pc.num_experts, pc.top_k, batch))
    if fp8_weights:
        head = mc.vocab_size * mc.hidden_size
        weight_bytes = (weights - head) * 1 + head * dtype_bytes
    else:
        weight_bytes = weights * dtype_bytes
    kv = batch * context * _kv_bytes_per_token(mc, dtype_bytes)
    return {"weight_bytes": weight_bytes, "kv_bytes": kv, "total_bytes": weight_bytes + kv}


def _kv_bytes_per_token(mc: ModelConfig, dtype_bytes: int) -> int:
    spec = mc.kv_spec(16)
    c, _, h, d = spec.page_shape
    return c * h * d * spec.num_layers * dtype_bytes


def attention_flops(mc: ModelConfig, tokens: int, context: int = 0) -> float:
    """Causal attention FLOPs for `tokens` new tokens after `context` cached ones (all layers)."""
    pairs = tokens * context + tokens * (tokens + 1) / 2
    if mc.is_mla:
        hf = mc.hf
        dims = (hf["kv_lora_rank"] + hf["qk_rope_head_dim"]) + hf["kv_lora_rank"]  # absorbed QK + PV
    else:
        dims = 2 * mc.head_dim
    return 2.0 * pairs * mc.num_heads * dims * mc.num_layers


def prefill_flops(mc: ModelConfig, tokens: int) -> float:
    return 2.0 * param_counts(mc).active_per_token * tokens + attention_flops(mc, tokens)


def floors(mc: ModelConfig, hbm_bytes_per_s: float, matmul_flops_per_s: float, batch: int, context: int,
           prefill_tokens: int, dtype_bytes: int = 2, fp8_weights: bool = False) -> dict:
    step = decode_step_bytes(mc, batch, context, dtype_bytes, fp8_weights)
    step_s = step["total_bytes"] / hbm_bytes_per_s
    pf = prefill_flops(mc, prefill_tokens)
    return {"decode_step_floor_s": step_s, "decode_tok_s_ceiling": batch / step_s,
            "decode_bytes": step["total_bytes"], "prefill_flops": pf,
            "prefill_floor_s": pf / matmul_flops_per_s,
            "prefill_tok_s_ceiling": prefill_tokens / (pf / matmul_flops_per_s)}
