"""What a model's HF config says about positions: its rope settings (either spelling) and how many
positions it can encode. Torch-free, so the config, the CLI and the router read it cheaply; the
cos/sin tables themselves are built in engine/layers/rotary.py.
"""
from __future__ import annotations

from typing import Any

DEFAULT_MAX_POSITION_EMBEDDINGS = 4096  # a config.json without the field (HF's Llama default is 2048; ours 4096)


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """Rope settings from either the transformers-5 `rope_parameters` or the older `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    for k, v in scaling.items():
        params.setdefault(k, v)
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = kind
    return params


def position_limit(hf: dict[str, Any]) -> tuple[int, str]:
    """The most positions the model can encode, and where that number comes from.

    `max_position_embeddings` is the limit (for Llama-3 scaling it already is the extended length).
    YaRN stretches a pre-training context `original_max_position_embeddings` by `factor`: DeepSeek-V3
    writes both (4096 x 40 = its max_position_embeddings 163840), while a Qwen checkpoint given a
    YaRN block keeps max_position_embeddings at the original length, so the extended length is
    factor x original (the rule vLLM applies too; HF fills a missing original from
    max_position_embeddings)."""
    base = int(hf.get("max_position_embeddings") or DEFAULT_MAX_POSITION_EMBEDDINGS)
    p = rope_parameters(hf)
    factor = p.get("factor")
    if p["rope_type"] == "yarn" and isinstance(factor, (int, float)) and factor > 1:
        original = int(p.get("original_max_position_embeddings") or base)
        extended = int(factor * original)
        if extended > base:
            return extended, (f"YaRN factor {factor:g} x original_max_position_embeddings {original}")
    return base, f"max_position_embeddings {base}"
