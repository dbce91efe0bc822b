"""Llama / Qwen3 / Qwen3-MoE against HF transformers on tiny random checkpoints."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models import WeightError
from tests.engine.hf_reference import build_hf_checkpoint, engine_logits, hf_logits, load_ours

TOKENS = [3, 17, 100, 5, 250, 42, 7, 7, 1, 99, 200, 31, 64, 128]
ARCHS = ["LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"]


def _assert_close(ours, ref):
    err = (ours - ref).abs().max().item()
    assert err < 2e-4 * max(1.0, ref.abs().max().item()), f"max abs error {err}"


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_every_decode_step_match_hf(arch, tmp_path):
    hf, path = build_hf_checkpoint(arch, tmp_path)
    model, mc = load_ours(path)
    ref = hf_logits(hf, TOKENS)
    _assert_close(engine_logits(model, mc, TOKENS, prompt_len=6), ref)
    _assert_close(engine_logits(model, mc, TOKENS, prompt_len=9, chunk_size=4, page_size=8), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_sequence_matches_hf_generate(arch, tmp_path):
    from engine import LLM, SamplingParams

    hf, path = build_hf_checkpoint(arch, tmp_path)
    prompt = TOKENS[:7]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                      pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(path, page_size=4, num_pages=64)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=8,
                                                                                  ignore_eos=True))[0]
    assert out.token_ids == ref


def test_llama3_rope_scaling_and_tied_embeddings(tmp_path):
    hf, path = build_hf_checkpoint("LlamaForCausalLM", tmp_path, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    model, mc = load_ours(path)
    assert model.lm_head.weight is model.embed_tokens.weight
    _assert_close(engine_logits(model, mc, TOKENS, prompt_len=5), hf_logits(hf, TOKENS))


def test_sharded_checkpoint_loads(tmp_path):
    hf, path = build_hf_checkpoint("Qwen3ForCausalLM", tmp_path, shard=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, mc = load_ours(path)
    _assert_close(engine_logits(model, mc, TOKENS, prompt_len=14), hf_logits(hf, TOKENS))


def _rewrite(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    _, path = build_hf_checkpoint("LlamaForCausalLM", tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightError, match="model.layers.1.mlp.up_proj.weight"):
        load_ours(path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3)}))
    with pytest.raises(WeightError, match=r"model.layers.1.mlp.up_proj.weight.*expected shape \(96, 64\)"):
        load_ours(path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(96, 64),
                                           "model.layers.9.bogus.weight": torch.zeros(2)}))
    with pytest.raises(WeightError, match="model.layers.9.bogus.weight"):
        load_ours(path)
