"""Model definitions: plain torch modules, one file per architecture family.

Contract every model class follows (gpt-fast style; no scheduling or I/O in here):

    model = Cls(config: ModelConfig, parallel: ParallelConfig)    # built on the target device/dtype
    hidden = model(input_ids [T] int64, positions [T] int64, batch: ForwardBatch)  # -> [T, hidden]
    logits = model.compute_logits(hidden [N, hidden])              # -> [N, vocab] float32
    loaded = model.load_weights(iter of (hf_name, tensor))         # -> set of parameter names filled

`load_weights` raises `WeightError` naming the tensor on an unknown name or a shape mismatch;
the loader checks afterwards that every parameter was filled.
"""
from __future__ import annotations

import importlib

from engine.layers.weights import WeightError  # noqa: F401  (models raise it; callers catch it here)

_REGISTRY = {
    "LlamaForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("engine.models.llama", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("engine.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("engine.models.deepseek", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("engine.models.deepseek", "DeepseekV3ForCausalLM"),
}


def get_model_class(architecture: str):
    if architecture not in _REGISTRY:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {', '.join(_REGISTRY)}")
    module, name = _REGISTRY[architecture]
    return getattr(importlib.import_module(module), name)
