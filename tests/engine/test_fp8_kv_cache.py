"""FP8 (e4m3) KV cache: tiny Qwen3 and DeepSeek-V3 (MLA) models decode through an FP8 pool with
the tokens of the full-precision pool; the layout carries the dtype, so a prefill/decode pair
whose KV dtypes differ is refused."""
from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError, EngineConfig, kv_cache_dtype
from tests.engine.hf_reference import build_hf_checkpoint, engine_logits, load_ours

TOKENS = [3, 17, 100, 5, 250, 42, 7, 7, 1, 99, 200, 31, 64, 128]


# (min positions whose top-1 agrees of 14, max logit error / largest logit), from measurements on
# these tiny random models: Qwen3 13/14 and 5.7%, DeepSeek-V3 12/14 and 21.9%. For scale, a bf16
# cache measures 0.47% and 0.39%: e4m3 keeps 3 mantissa bits to bf16's 7 (16x coarser steps), and
# these models amplify errors (random 0.08-std weights, no training).
TOLERANCE = {"Qwen3ForCausalLM": (13, 0.08), "DeepseekV3ForCausalLM": (12, 0.30)}


@pytest.mark.parametrize("arch", list(TOLERANCE))
def test_fp8_kv_cache_keeps_the_tokens_of_the_full_precision_cache(arch, tmp_path):
    """Teacher-forced over 14 positions (6 prefill, 8 decode steps; chunked prefill too)."""
    _, path = build_hf_checkpoint(arch, tmp_path)
    model, mc = load_ours(path)
    ref = engine_logits(model, mc, TOKENS, prompt_len=6)
    min_agree, max_rel = TOLERANCE[arch]
    for kw in (dict(prompt_len=6), dict(prompt_len=10, chunk_size=3, page_size=8)):
        out = engine_logits(model, mc, TOKENS, kv_dtype=torch.float8_e4m3fn, **kw)
        agree = int((out.argmax(-1) == ref.argmax(-1)).sum())
        rel = ((out - ref).abs().max() / ref.abs().max()).item()
        assert agree >= min_agree and rel < max_rel, (agree, rel)


def test_fp8_kv_halves_a_bf16_page_and_names_its_dtype(tmp_path):
    from engine.presets import resolve_model

    mc = resolve_model("deepseek-v3", "bfloat16")
    fp8 = mc.kv_spec(16, kv_cache_dtype("fp8_e4m3", mc.dtype))
    assert fp8.page_bytes * 2 == mc.kv_spec(16).page_bytes
    assert fp8.describe()["dtype"] == "float8_e4m3fn"
    assert kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineConfig(model="tiny-qwen3", kv_cache_dtype="fp8_e5m2")


def test_prefill_and_decode_with_different_kv_dtypes_are_refused():
    from engine.presets import resolve_model
    from kvtransfer.agent import KVLayoutMismatch, check_layouts

    mc = resolve_model("tiny-qwen3", "bfloat16")
    prefill = mc.kv_spec(16, torch.float8_e4m3fn).describe()
    decode = mc.kv_spec(16).describe()
    with pytest.raises(KVLayoutMismatch, match="dtype: ours 'float8_e4m3fn' vs theirs 'bfloat16'"):
        check_layouts(prefill, decode)
    check_layouts(prefill, dict(prefill))
