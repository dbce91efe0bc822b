"""Named model presets: the real `config.json` of well-known checkpoints, and tiny configs of the
same architectures for CPU runs and tests.

Presets carry no weights: run them with `--load-format dummy` (seeded random weights) or point
`--model` at a checkpoint directory. Real configs are copied field for field from the published
checkpoints. DeepSeek-V3 is listed twice: `deepseek-v3` in bf16, and `deepseek-v3-fp8` as it ships,
with its `quantization_config` (e4m3 weights in 128x128 blocks: dummy weights are drawn in FP8).
"""
from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

from engine.config import ConfigError, ModelConfig, read_config_json, resolve_dtype

if TYPE_CHECKING:
    import torch

_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_nextn_predict_layers": 1, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "attention_bias": False, "attention_dropout": 0.0,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "initializer_range": 0.02,
}

_DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6, "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
    "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "attention_bias": False, "attention_dropout": 0.0,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "initializer_range": 0.02,
}

_QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": None, "attention_bias": False, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16", "initializer_range": 0.02,
}

_QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None, "attention_bias": False,
    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16", "initializer_range": 0.02,
}

_LLAMA_3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None, "attention_bias": False,
    "mlp_bias": False, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "torch_dtype": "bfloat16", "initializer_range": 0.02,
}

_FP8_BLOCKS = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

# Tiny presets use the DeepSeek tokenizer's vocabulary (the default tokenizer) so text prompts work.
_TINY_VOCAB = 129280
_TINY_COMMON = {"vocab_size": _TINY_VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1,
                "tie_word_embeddings": False, "torch_dtype": "float32", "initializer_range": 0.02,
                "hidden_act": "silu", "attention_bias": False}


def _tiny(base: dict[str, Any], **fields) -> dict[str, Any]:
    cfg = copy.deepcopy(base)
    cfg.update(_TINY_COMMON)
    cfg.update(fields)
    return cfg


PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-v3-fp8": dict(copy.deepcopy(_DEEPSEEK_V3), quantization_config=_FP8_BLOCKS),
    "deepseek-v2-lite": _DEEPSEEK_V2_LITE,
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
    "qwen3-8b": _QWEN3_8B,
    "llama-3-8b": _LLAMA_3_8B,
    "tiny-llama": _tiny(_LLAMA_3_8B, intermediate_size=128, num_key_value_heads=2, rope_theta=10000.0,
                        tie_word_embeddings=True),
    "tiny-qwen3": _tiny(_QWEN3_8B, intermediate_size=128, num_key_value_heads=2, head_dim=16),
    "tiny-qwen3-moe": _tiny(_QWEN3_30B_A3B, intermediate_size=128, moe_intermediate_size=32,
                            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2),
    "tiny-deepseek-v2": _tiny(_DEEPSEEK_V2_LITE, intermediate_size=128, moe_intermediate_size=32,
                              num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                              kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                              rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 0.707,
                                            "mscale_all_dim": 0.707, "original_max_position_embeddings": 512,
                                            "type": "yarn"}),
    "tiny-deepseek-v3": _tiny(_DEEPSEEK_V3, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32,
                              num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                              n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
                              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_nextn_predict_layers=0,
                              rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 512,
                                            "type": "yarn"}),
}
# The block format at tiny widths: 32x32 blocks divide every merged projection (gate/up 128, experts 32).
PRESETS["tiny-deepseek-v3-fp8"] = dict(copy.deepcopy(PRESETS["tiny-deepseek-v3"]),
                                       quantization_config=dict(_FP8_BLOCKS, weight_block_size=[32, 32]))


def list_presets() -> list[str]:
    return list(PRESETS)


def preset_config(name: str) -> dict[str, Any]:
    """A fresh copy of a preset's HF config dict."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def model_hf(name_or_dir: str) -> tuple[dict[str, Any], str | None]:
    """A preset's or checkpoint directory's HF config dict, and the directory (None for a preset)."""
    if name_or_dir in PRESETS:
        return preset_config(name_or_dir), None
    if os.path.isdir(name_or_dir):
        return read_config_json(name_or_dir), name_or_dir
    raise ConfigError(f"unknown model {name_or_dir!r}: not a preset ({', '.join(PRESETS)}) "
                      f"and not a checkpoint directory")


def resolve_model(name_or_dir: str, dtype: str | torch.dtype = "auto") -> ModelConfig:
    """A preset name or an HF checkpoint directory → ModelConfig (path set only for directories)."""
    hf, path = model_hf(name_or_dir)
    return ModelConfig(hf=hf, path=path, dtype=resolve_dtype(dtype, hf))


def check_model(name_or_dir: str, max_model_len: int | None) -> None:
    """ConfigError if the model is unknown, its config is broken or unsupported, or it cannot position
    `max_model_len` tokens, without importing torch (launchers check this before starting anything).
    The ModelConfig made here is only validated: its dtype stays a name."""
    hf, path = model_hf(name_or_dir)
    ModelConfig(hf=hf, path=path, dtype=str(hf.get("torch_dtype") or "auto")).check_max_model_len(
        max_model_len, name_or_dir)
