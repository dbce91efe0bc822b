"""OpenAI request parsing and logprob shapes, without a cluster."""
from __future__ import annotations

import pytest

from engine.tokenizer import load_tokenizer
from router.openai_format import Choice, LogprobFormatter, ResponseBuilder, completion_prompts, sampling_params


def test_the_four_prompt_forms():
    assert completion_prompts("hi") == ["hi"]
    assert completion_prompts([1, 2]) == [[1, 2]]
    assert completion_prompts(["a", "b"]) == ["a", "b"]
    assert completion_prompts([[1], "b"]) == [[1], "b"]
    for bad in ([], [True, 2], {"x": 1}, [["a"]], 5, None):
        with pytest.raises(ValueError):
            completion_prompts(bad)


def test_logprob_fields_map_to_sampling_params():
    assert sampling_params({"logprobs": True, "top_logprobs": 4}, chat=True).logprobs == 4
    assert sampling_params({"logprobs": False}, chat=True).logprobs is None
    p = sampling_params({"logprobs": 2, "echo": True}, chat=False)
    assert (p.logprobs, p.prompt_logprobs) == (2, 2)
    assert sampling_params({"logprobs": 0}, chat=False).prompt_logprobs is None
    for body, chat in (({"top_logprobs": 3}, True), ({"logprobs": True}, False), ({"logprobs": 21}, False),
                       ({"n": 0}, False), ({"n": 1.5}, True), ({"n": True}, False), ({"n": 3, "best_of": 2}, False),
                       ({"prompt_logprobs": -1}, False)):
        with pytest.raises(ValueError):
            sampling_params(body, chat)


def test_n_maps_to_choices_and_usage_counts_each_prompt_once():
    assert sampling_params({"n": 3, "best_of": 3, "seed": 4}, chat=True).n == 3
    choices = [Choice(p * 2 + j, "r", None, [1, 2, 3, 4][: 2 + p], j) for p in range(2) for j in range(2)]
    for i, c in enumerate(choices):
        c.usage = (len(c.ids), 5 + i, 0)
    reply = ResponseBuilder("r", "m", False, False, None, sampling_params({"n": 2}, chat=False))
    assert reply.total_usage(choices) == {"prompt_tokens": 2 + 3, "completion_tokens": 5 + 6 + 7 + 8,
                                          "total_tokens": 5 + 26}


def test_completion_logprobs_with_echoed_prompt():
    tok = load_tokenizer(None)
    ids = tok.encode("Hello world", add_special_tokens=False)
    fmt = LogprobFormatter(tok)
    prompt_lps = [None] + [{"token_id": t, "logprob": -1.0, "rank": 1, "top_logprobs": {t: -1.0}} for t in ids[1:]]
    out = fmt.completion([{"token_id": 13, "logprob": -0.5, "rank": 2, "top_logprobs": {7: -0.1, 13: -0.5}}],
                         0, (ids, prompt_lps))
    assert "".join(out["tokens"][:len(ids)]) == "Hello world"
    assert out["token_logprobs"][0] is None and out["top_logprobs"][0] is None
    assert out["token_logprobs"][-1] == -0.5 and list(out["top_logprobs"][-1].values()) == [-0.1, -0.5]
    assert out["text_offset"] == [sum(len(t) for t in out["tokens"][:i]) for i in range(len(out["tokens"]))]
    chat = fmt.chat([{"token_id": 13, "logprob": -0.5, "rank": 2, "top_logprobs": {7: -0.1, 13: -0.5}}])
    item = chat["content"][0]
    assert item["bytes"] == list(item["token"].encode()) and [t["logprob"] for t in item["top_logprobs"]] == [-0.1, -0.5]
