"""What a model's forward pass gets besides token ids and positions: attention metadata, the
per-layer KV pool tensors and the chosen attention backend; plus an optional expert-load
recorder for EPLB. Built by the model runner, read by layers; models never build it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import AttentionMetadata


@dataclass
class ForwardBatch:
    attn: AttentionMetadata
    kv_caches: list[torch.Tensor]  # kv_caches[layer_id]: [num_pages, *page_shape]
    backend: AttentionBackend
    # [num_layers, num_logical_experts] token counts per expert, accumulated by MoE layers when
    # set (EPLB's load window); None = not recording.
    expert_load: torch.Tensor | None = None
    # Called with the layer index after each decoder layer wrote its KV (prefill role: push that
    # layer's pages while later layers compute). Never set for CUDA-graph decode steps.
    on_layer_done: Callable[[int], None] | None = None
