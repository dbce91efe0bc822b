"""DeepSeek-V2 / V3 (MLA + DeepSeekMoE) against HF transformers on tiny random checkpoints."""
from __future__ import annotations

import pytest
import torch

from engine.kv_cache import KVPool
from tests.engine.hf_reference import build_hf_checkpoint, engine_logits, hf_logits, load_ours

TOKENS = [3, 17, 100, 5, 250, 42, 7, 7, 1, 99, 200, 31, 64, 128]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0}

VARIANTS = {
    "v2": ("DeepseekV2ForCausalLM", {}),
    "v2-qlora-yarn": ("DeepseekV2ForCausalLM", dict(q_lora_rank=24, rope_parameters=YARN)),
    "v2-group-limited": ("DeepseekV2ForCausalLM", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1)),
    "v3": ("DeepseekV3ForCausalLM", {}),
    "v3-yarn-no-qlora": ("DeepseekV3ForCausalLM", dict(q_lora_rank=None, rope_parameters=dict(YARN, mscale=1.0,
                                                                                               mscale_all_dim=1.0))),
}


def _assert_close(ours, ref):
    err = (ours - ref).abs().max().item()
    assert err < 2e-4 * max(1.0, ref.abs().max().item()), f"max abs error {err}"


@pytest.fixture(params=["absorbed", "decompressed"])
def mla_prefill(request, monkeypatch):
    """Run prefill chunks in either MLA form (decode steps are always absorbed)."""
    import engine.layers.mla as mla

    monkeypatch.setattr(mla, "DECOMPRESS_MIN_TOKENS", 1 if request.param == "decompressed" else 10**9)
    return request.param


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_decode_and_chunked_logits_match_hf(variant, mla_prefill, tmp_path):
    arch, kw = VARIANTS[variant]
    hf, path = build_hf_checkpoint(arch, tmp_path, **kw)
    model, mc = load_ours(path)
    ref = hf_logits(hf, TOKENS)
    _assert_close(engine_logits(model, mc, TOKENS, prompt_len=6), ref)
    _assert_close(engine_logits(model, mc, TOKENS, prompt_len=10, chunk_size=3, page_size=8), ref)


@pytest.mark.parametrize("arch", ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"])
def test_greedy_sequence_matches_hf_generate(arch, mla_prefill, tmp_path):
    from engine import LLM, SamplingParams

    hf, path = build_hf_checkpoint(arch, tmp_path)
    prompt = TOKENS[:7]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                      pad_token_id=0)[0, len(prompt):].tolist()
    out = LLM(path, page_size=4, num_pages=64).generate(
        prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == ref


def test_mla_cache_holds_only_latent_and_rope_key(tmp_path):
    _, path = build_hf_checkpoint("DeepseekV3ForCausalLM", tmp_path)
    _, mc = load_ours(path)
    spec = mc.kv_spec(page_size=4)
    assert spec.page_shape == (1, 4, 1, 32 + 8)  # kv_lora_rank + qk_rope_head_dim, one head
    assert KVPool(spec, 2, "cpu").layers[0].shape == (2, 1, 4, 1, 40)
