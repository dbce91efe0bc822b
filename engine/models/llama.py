"""Llama and Qwen3 (dense, GQA): pre-norm decoder layers with SwiGLU MLPs. Qwen3 adds per-head
RMSNorm on q and k before the rotary embedding and an explicit `head_dim`."""
from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig, ParallelConfig
from engine.forward_batch import ForwardBatch
from engine.layers.attention import GQAttention
from engine.layers.embedding import LMHead, VocabEmbedding
from engine.layers.mlp import GatedMLP
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.layers.weights import WeightTable, into


def skip_buffers(name: str) -> bool:
    return "rotary_emb." in name


class DecoderLayer(nn.Module):
    """Attention + MLP (dense or MoE, built by the model) with pre-norms and a fused residual."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, positions, hidden, residual, batch: ForwardBatch):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        if getattr(self.mlp, "needs_batch", False):
            return self.mlp(hidden, batch), residual
        return self.mlp(hidden), residual

    def register_weights(self, table: WeightTable, prefix: str) -> None:
        self.self_attn.register_weights(table, f"{prefix}.self_attn")
        self.mlp.register_weights(table, f"{prefix}.mlp")
        table.add(f"{prefix}.input_layernorm.weight", into(self.input_layernorm.weight))
        table.add(f"{prefix}.post_attention_layernorm.weight", into(self.post_attention_layernorm.weight))


class CausalLM(nn.Module):
    """Embedding → decoder layers → final norm; LM head (tied or not). Subclasses build layers."""

    qk_norm = False

    def __init__(self, config: ModelConfig, parallel: ParallelConfig | None = None):
        super().__init__()
        hf = config.hf
        self.config = config
        self.parallel = parallel or ParallelConfig()
        self.eps = float(hf.get("rms_norm_eps", 1e-6))
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.rope = self.build_rope()
        self.layers = nn.ModuleList([self.build_layer(i) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, self.eps)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.embed_tokens)

    def build_rope(self) -> nn.Module:
        c = self.config
        return RotaryEmbedding(c.head_dim, c.max_model_len, c.hf, interleaved=False)

    def build_attention(self, i: int) -> nn.Module:
        c = self.config
        return GQAttention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, i, self.rope,
                           qk_norm_eps=self.eps if self.qk_norm else None, bias=bool(c.hf.get("attention_bias")))

    def build_mlp(self, i: int) -> nn.Module:
        c = self.config
        return GatedMLP(c.hidden_size, c.hf["intermediate_size"], bias=bool(c.hf.get("mlp_bias")))

    def build_layer(self, i: int) -> nn.Module:
        return DecoderLayer(self.build_attention(i), self.build_mlp(i), self.config.hidden_size, self.eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual, batch)
            if batch.on_layer_done is not None:
                batch.on_layer_done(i)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def weight_table(self) -> WeightTable:
        table = WeightTable(self.config.architecture)
        table.add("model.embed_tokens.weight", into(self.embed_tokens.weight))
        for i, layer in enumerate(self.layers):
            layer.register_weights(table, f"model.layers.{i}")
        table.add("model.norm.weight", into(self.norm.weight))
        tied = self.lm_head.tied
        table.add("lm_head.weight", into(self.lm_head.weight), optional=tied)
        return table

    def skip_weight(self, name: str) -> bool:
        return skip_buffers(name)

    def load_weights(self, weights) -> set[str]:
        self.weight_table().load(weights, skip=self.skip_weight)
        return {name for name, _ in self.named_parameters()}


class LlamaForCausalLM(CausalLM):
    pass


class Qwen3ForCausalLM(CausalLM):
    qk_norm = True
