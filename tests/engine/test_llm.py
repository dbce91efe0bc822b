"""End-to-end behaviour of the offline engine (scheduler + runner + sampler + front) on CPU.

The model-level HF comparisons live in test_models_*.py; here the reference is either HF
`generate` on the same checkpoint or the engine's own single-request run, and the invariant that
the KV pool returns to full.
"""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.engine_core import RequestError

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 8], [11, 12], [400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411,
                                                          412, 413, 414, 415, 416, 417, 418, 419, 420, 421],
           [9, 9, 9, 9]]


def _llm(model="tiny-llama", **kw) -> LLM:
    kw.setdefault("load_format", "dummy")
    kw.setdefault("page_size", 4)
    kw.setdefault("num_pages", 256)
    return LLM(model, **kw)


def _free_pages_back_to_full(llm: LLM) -> bool:
    pool = llm.core.scheduler.block_pool
    cached = llm.core.scheduler.radix.num_evictable_pages() if llm.core.scheduler.radix else 0
    return pool.num_free_pages + cached == pool.num_pages


def _greedy(n=12) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def reference_outputs():
    llm = _llm()
    return [llm.generate(prompt_token_ids=[p], sampling_params=_greedy())[0].token_ids for p in PROMPTS]


def test_batched_greedy_equals_each_request_alone(reference_outputs):
    llm = _llm()
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=_greedy())
    assert [o.token_ids for o in outs] == reference_outputs
    assert all(o.finish_reason == "length" for o in outs)
    assert _free_pages_back_to_full(llm)


def test_chunked_prefill_gives_the_same_tokens(reference_outputs):
    llm = _llm(max_num_batched_tokens=5)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=_greedy())
    assert [o.token_ids for o in outs] == reference_outputs
    assert _free_pages_back_to_full(llm)


def test_preemption_and_recompute_give_the_same_tokens(reference_outputs):
    # 16 pages of 4 tokens cannot hold all four sequences at once: someone gets preempted.
    llm = _llm(num_pages=16)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=_greedy())
    assert [o.token_ids for o in outs] == reference_outputs
    assert llm.core.scheduler.stats()["num_preemptions"] > 0
    assert _free_pages_back_to_full(llm)


def test_prefix_cache_hit_gives_the_same_tokens(reference_outputs):
    llm = _llm()
    first = llm.generate(prompt_token_ids=[PROMPTS[2]], sampling_params=_greedy())[0]
    again = llm.generate(prompt_token_ids=[PROMPTS[2]], sampling_params=_greedy())[0]
    assert first.token_ids == again.token_ids == reference_outputs[2]
    assert again.num_cached_tokens >= 16  # 22-token prompt, 4-token pages: at least 4 full pages reused
    assert _free_pages_back_to_full(llm)


def test_same_seed_same_output_whatever_the_batch():
    llm = _llm()
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=sp)[0].token_ids
    other = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    batched = llm.generate(prompt_token_ids=[PROMPTS[1], PROMPTS[0], PROMPTS[3]],
                           sampling_params=[other, sp, other])[1].token_ids
    assert alone == batched


def test_text_prompt_and_stop_string_truncate_output():
    llm = _llm()
    full = llm.generate(["Hello world"], _greedy(12))[0]
    assert full.text and full.finish_reason == "length"
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    if not stop.strip():
        pytest.skip("dummy weights produced whitespace-only text")
    cut = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert stop not in cut.text and full.text.startswith(cut.text)
    assert _free_pages_back_to_full(llm)


def test_bad_requests_are_refused_and_the_engine_keeps_serving(reference_outputs):
    llm = _llm(max_model_len=32)
    with pytest.raises(RequestError, match="context limit"):
        llm.generate(prompt_token_ids=[list(range(40))], sampling_params=_greedy())
    with pytest.raises(RequestError, match="empty"):
        llm.generate(prompt_token_ids=[[]], sampling_params=_greedy())
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate(prompt_token_ids=[[1, 2, 10**9]], sampling_params=_greedy())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    out = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=_greedy())[0]
    assert out.token_ids == reference_outputs[0]
    assert _free_pages_back_to_full(llm)


def test_generation_stops_at_the_context_limit():
    llm = _llm(max_model_len=16)
    out = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=SamplingParams(
        temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(PROMPTS[0]) + len(out.token_ids) <= 16
    assert _free_pages_back_to_full(llm)


def test_abort_in_the_middle_frees_every_page():
    llm = _llm()
    core = llm.core
    for i, p in enumerate(PROMPTS):
        core.add_request(f"r{i}", p, _greedy(50))
    for _ in range(3):
        core.step()
    assert core.abort("r1") and not core.abort("r1")  # idempotent
    for i in (0, 2, 3):
        core.abort(f"r{i}")
    outs = core.step()
    assert {o.request_id for o in outs if o.finished} >= {"r0", "r2", "r3"}
    assert not core.has_unfinished()
    assert _free_pages_back_to_full(llm)


@pytest.mark.parametrize("model", ["tiny-qwen3", "tiny-qwen3-moe", "tiny-deepseek-v2", "tiny-deepseek-v3"])
def test_every_tiny_preset_generates_with_dummy_weights(model):
    llm = _llm(model)
    outs = llm.generate(prompt_token_ids=PROMPTS[:2], sampling_params=_greedy(4))
    assert [len(o.token_ids) for o in outs] == [4, 4]
    assert all(0 <= t < llm.model_config.vocab_size for o in outs for t in o.token_ids)
    assert _free_pages_back_to_full(llm)


def test_logprobs_are_returned_per_token():
    llm = _llm()
    out = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True, logprobs=2))[0]
    assert len(out.logprobs) == 3
    assert torch.isfinite(torch.tensor([float(_sampled_logprob(lp)) for lp in out.logprobs])).all()


def _sampled_logprob(entry):
    for name in ("logprob", "sampled_logprob"):
        if hasattr(entry, name):
            return getattr(entry, name)
        if isinstance(entry, dict) and name in entry:
            return entry[name]
    raise AssertionError(f"no sampled logprob in {entry!r}")
