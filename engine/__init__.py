"""pdserve's model runtime, shared by prefill and decode nodes: configs, models, layers, kernels,
paged KV pool, prefix cache, scheduler, sampler, model runner and the engine loop. It knows
nothing about gRPC, routers or other nodes.

    from engine import LLM, SamplingParams
    LLM(model="tiny-llama", load_format="dummy").generate(["Hello"], SamplingParams(max_tokens=8))
"""
from __future__ import annotations

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # Lazy, so light users (config parsing, the router) do not pay for torch model imports.
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from engine.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
