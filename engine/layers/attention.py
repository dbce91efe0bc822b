"""Grouped-query attention block (Llama, Qwen3): merged QKV projection, optional per-head
QK RMSNorm (Qwen3), rotary embedding and the KV write (one fused op, `fused_ops.py`), the paged
attention backend, output projection."""
from __future__ import annotations

import torch
from torch import nn

from engine.forward_batch import ForwardBatch
from engine.layers import fused_ops
from engine.layers.linear import Linear, MergedLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.layers.weights import WeightTable, into, into_shard


class GQAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_id: int,
                 rope: RotaryEmbedding, qk_norm_eps: float | None = None, bias: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_id = layer_id
        self.scale = head_dim ** -0.5
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = MergedLinear(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=bias)
        self.o_proj = Linear(self.q_size, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.rope = rope

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        t = hidden.shape[0]
        kv_cache, meta = batch.kv_caches[self.layer_id], batch.attn
        norm = self.q_norm is not None
        q, k, v = fused_ops.qk_norm_rope_write_kv(
            self.qkv_proj(hidden), positions, self.rope.cos, self.rope.sin, self.q_norm.weight if norm else None,
            self.k_norm.weight if norm else None, self.q_norm.eps if norm else 0.0, kv_cache, meta.slot_mapping,
            self.num_heads, self.num_kv_heads, self.rope.interleaved)
        backend, scale = batch.backend, self.scale
        out = batch.attend(lambda m, q_, k_, v_: backend.gqa(q_, k_, v_, kv_cache, m, scale, kv_written=True),
                           q, k, v, out_shape=(t, self.num_heads, self.head_dim))
        return self.o_proj(out.reshape(t, self.q_size))

    def register_weights(self, table: WeightTable, prefix: str) -> None:
        params = ["weight"] + (["bias"] if self.qkv_proj.bias is not None else [])
        for p in params:
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                table.add(f"{prefix}.{proj}.{p}", into_shard(self.qkv_proj, i, p))
        table.add(f"{prefix}.o_proj.weight", into(self.o_proj.weight))
        if self.q_norm is not None:
            table.add(f"{prefix}.q_norm.weight", into(self.q_norm.weight))
            table.add(f"{prefix}.k_norm.weight", into(self.k_norm.weight))
