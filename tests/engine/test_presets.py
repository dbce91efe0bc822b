"""Presets carry real configs; the loader refuses broken checkpoints with errors that name the problem."""
from __future__ import annotations

import json

import pytest
import torch

from engine.config import ConfigError, ModelConfig
from engine.models import WeightError
from engine.presets import PRESETS, list_presets, resolve_model
from engine.weight_loader import checkpoint_files, iter_safetensors


def test_every_preset_normalises_and_has_a_transfer_layout():
    for name in list_presets():
        mc = resolve_model(name)
        spec = mc.kv_spec(page_size=16)
        assert spec.page_bytes > 0 and spec.bytes_per_token > 0
        assert mc.architecture == PRESETS[name]["architectures"][0]


def test_real_presets_have_published_shapes():
    v3 = resolve_model("deepseek-v3", "bfloat16")
    # MLA caches latent + rope key only: (512 + 64) * 2 bytes * 61 layers per token
    assert v3.kv_spec(64).bytes_per_token == (512 + 64) * 2 * 61
    assert v3.is_mla and v3.is_moe and v3.hf["n_routed_experts"] == 256
    q8 = resolve_model("qwen3-8b", "bfloat16")
    assert q8.kv_spec(16).bytes_per_token == 2 * 8 * 128 * 2 * 36
    lite = resolve_model("deepseek-v2-lite")
    assert lite.dtype == torch.bfloat16 and lite.hf["q_lora_rank"] is None


def test_unknown_model_and_unknown_architecture_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no-such-model"):
        resolve_model("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10,
                                                      "hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 1}))
    with pytest.raises(ConfigError, match="unsupported architecture 'GPT2LMHeadModel'"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_checkpoint_without_weights_or_with_a_missing_shard_is_refused(tmp_path):
    with pytest.raises(WeightError, match="no \\*.safetensors"):
        checkpoint_files(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(WeightError, match="model-00001-of-00002.safetensors"):
        checkpoint_files(str(tmp_path))


def test_corrupt_safetensors_file_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightError, match="model.safetensors"):
        list(iter_safetensors(str(tmp_path)))
