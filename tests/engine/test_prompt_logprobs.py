"""Prompt logprobs computed during prefill equal log-softmax of HF `transformers`' logits of the same
checkpoint, whole or in chunks, after a prefix-cache hit and next to requests that do not ask."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.hf_reference import build_hf_checkpoint, hf_logits

PROMPT = [5, 17, 200, 42, 7, 99, 100, 3, 8, 61, 250, 12, 33]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_hf_checkpoint("LlamaForCausalLM", tmp_path_factory.mktemp("pl") / "llama", seed=3)


def _expected(hf_model, ids, top_n):
    lp = torch.log_softmax(hf_logits(hf_model, ids), dim=-1)
    out = [None]
    for p in range(len(ids) - 1):
        t = ids[p + 1]
        vals, idx = lp[p].topk(top_n)
        out.append((t, float(lp[p, t]), int((lp[p] > lp[p, t]).sum()) + 1, dict(zip(idx.tolist(), vals.tolist()))))
    return out


def _check(got, expected):
    assert len(got) == len(expected) and got[0] is None
    for g, (t, lp, rank, top) in zip(got[1:], expected[1:]):
        assert g["token_id"] == t and g["rank"] == rank
        assert g["logprob"] == pytest.approx(lp, abs=2e-4)
        assert list(g["top_logprobs"]) == list(top)
        assert list(g["top_logprobs"].values()) == pytest.approx(list(top.values()), abs=2e-4)


@pytest.mark.parametrize("chunk", [None, 5])
def test_prompt_logprobs_equal_transformers(checkpoint, chunk):
    hf_model, path = checkpoint
    kw = dict(max_num_batched_tokens=chunk) if chunk else {}
    llm = LLM(path, dtype="float32", device="cpu", page_size=4, num_pages=64, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=3)
    plain = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    outs = [llm.generate(prompt_token_ids=[p], sampling_params=sp)[0]
            for p, sp in ((PROMPT, params), (PROMPT[:6], plain), (PROMPT, params))]
    expected = _expected(hf_model, PROMPT, 3)
    _check(outs[0].prompt_logprobs, expected)
    assert outs[1].prompt_logprobs is None
    _check(outs[2].prompt_logprobs, expected)  # the same prompt again: cached pages, yet computed
    assert not llm.core.runner.prompt_logprobs._lists  # every list went out with its first token


def test_batch_with_and_without_prompt_logprobs(checkpoint):
    hf_model, path = checkpoint
    llm = LLM(path, dtype="float32", device="cpu", page_size=4, num_pages=64, max_num_batched_tokens=8)
    SP = SamplingParams
    core = llm.core
    other = [30, 31, 32, 33, 34, 35, 36]
    reqs = {"a": (PROMPT, SP(temperature=0.0, max_tokens=1, prompt_logprobs=0)),
            "b": (other, SP(temperature=0.0, max_tokens=1))}
    for rid, (ids, sp) in reqs.items():
        core.add_request(rid, ids, sp)
    got = {}
    while core.has_unfinished():
        for out in core.step():
            if out.prompt_logprobs is not None:
                got[out.request_id] = out.prompt_logprobs
    assert set(got) == {"a"}
    assert not core.runner.prompt_logprobs._lists
    _check([g if g is None else {**g, "top_logprobs": {}} for g in got["a"]],
           [e if e is None else (*e[:3], {}) for e in _expected(hf_model, PROMPT, 1)])


def test_abort_mid_prefill_leaves_no_list_behind(checkpoint):
    _, path = checkpoint
    llm = LLM(path, dtype="float32", device="cpu", page_size=4, num_pages=64, max_num_batched_tokens=4)
    core = llm.core
    core.add_request("r", PROMPT, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))
    core.step()
    core.step()
    assert core.runner.prompt_logprobs._lists  # partway through the prompt
    core.abort("r")
    while core.has_unfinished():
        core.step()
    assert not core.runner.prompt_logprobs._lists
