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
    # Set by a piecewise prefill CUDA graph (engine/prefill_graph.py): the attention core runs outside
    # the captured graphs, over the step's real metadata. See `attend`.
    attention_cut: Callable | None = None

    def attend(self, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, out_shape: tuple[int, ...],
               meta: AttentionMetadata | None = None) -> torch.Tensor:
        """A layer's attention core, `fn(meta, *inputs)` → a tensor of `out_shape` in `inputs[0]`'s dtype,
        where `meta` is this step's metadata (or the part of it given). Everything a layer computes before
        and after it depends only on the token count; the attention alone reads lengths, pages and prefixes.
        So a piecewise prefill graph cuts its capture here: `attention_cut(fn, inputs, out_shape)` hands
        the inputs over in static buffers and returns the static tensor the eager attention will fill at
        each replay, over the replayed step's own metadata."""
        if self.attention_cut is None:
            return fn(self.attn if meta is None else meta, *inputs)
        return self.attention_cut(fn, inputs, out_shape)
