"""`RequestState`, the one place token deltas become text deltas with stop strings: the engine
front's form (`process`, one delta per engine delta) and the router's (`relay`, a terminal delta of
its own with the usage) give the same text, finish and counts for the same engine deltas."""
from __future__ import annotations

import pytest

from engine.output_processor import RequestState
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import load_tokenizer

PROMPT = [5, 6, 7]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _engine_deltas(tok, text: str, reason: str = "length") -> list[RequestOutput]:
    ids = tok.encode(text)
    outs = [RequestOutput("r", [t], num_prompt_tokens=len(PROMPT), num_cached_tokens=2) for t in ids]
    outs[-1].finished, outs[-1].finish_reason = True, reason
    return outs


def _run_process(state, deltas):
    got = []
    for out in deltas:
        delta, stopped = state.process(out)
        got.append(delta)
        if delta.finished:
            return got, stopped
    raise AssertionError("no finished delta")


def _run_relay(state, deltas):
    got = []
    for out in deltas:
        got += state.relay(out)
        if got and got[-1].finished:
            return got
    raise AssertionError("no finished delta")


@pytest.mark.parametrize("stop,want_text,want_reason", [
    (None, "The answer is 42. STOP here", ("length", None)),
    (["STOP"], "The answer is 42. ", ("stop", "STOP")),
])
def test_engine_front_and_router_forms_agree(tok, stop, want_text, want_reason):
    params = SamplingParams(max_tokens=64, stop=stop)
    deltas = _engine_deltas(tok, "The answer is 42. STOP here")
    front, stopped = _run_process(RequestState("r", None, PROMPT, params, tok), deltas)
    routed = _run_relay(RequestState("r", None, PROMPT, params, tok), deltas)
    assert stopped == (stop is not None)
    for got in (front, routed):
        assert "".join(d.text for d in got) == want_text
        assert (got[-1].finish_reason, got[-1].stop_reason) == want_reason
        assert [d.finished for d in got].count(True) == 1
    # The router's terminal delta carries no ids, only the usage of everything relayed before it.
    ids = [t for d in routed for t in d.token_ids]
    assert routed[-1].token_ids == [] and routed[-1].num_output_tokens == len(ids)
    assert routed[-1].usage() == {"prompt_tokens": 3, "completion_tokens": len(ids), "total_tokens": 3 + len(ids)}
    assert routed[-1].num_cached_tokens == 2
    assert [t for d in front for t in d.token_ids] == ids


def test_router_form_drops_the_held_back_text_of_an_error_end(tok):
    params = SamplingParams(max_tokens=8, stop=["STOPPER"])
    state = RequestState("r", None, PROMPT, params, tok)
    deltas = state.relay(RequestOutput("r", tok.encode("ok STOP")))
    deltas += state.relay(RequestOutput("r", [], finished=True, finish_reason="error", error="node died"))
    assert "".join(d.text for d in deltas) == "ok "  # "STOP" could have begun the stop string
    assert (deltas[-1].finish_reason, deltas[-1].error) == ("error", "node died")


def test_offline_result_accumulates_ids_text_and_logprobs(tok):
    state = RequestState("r", "p", PROMPT, SamplingParams(max_tokens=2), tok)
    first, _ = state.process(RequestOutput("r", [100], [{"token_id": 100}]))
    last, _ = state.process(RequestOutput("r", [200], [{"token_id": 200}], finished=True, finish_reason="length"))
    result = state.result(last)
    assert result.token_ids == [100, 200] and result.text == first.text + last.text
    assert [lp["token_id"] for lp in result.logprobs] == [100, 200]
    assert (result.prompt, result.prompt_token_ids, result.finish_reason) == ("p", PROMPT, "length")


def test_prompt_logprobs_ride_the_first_delta_in_both_forms_and_the_result(tok):
    prompt_lps = [None, {"token_id": 6, "logprob": -1.0, "rank": 1, "top_logprobs": {}},
                  {"token_id": 7, "logprob": -2.0, "rank": 3, "top_logprobs": {}}]
    deltas = _engine_deltas(tok, "a b c")
    deltas[0].prompt_logprobs = prompt_lps
    params = SamplingParams(max_tokens=8, prompt_logprobs=0)
    state = RequestState("r", None, PROMPT, params, tok)
    front, _ = _run_process(state, deltas)
    routed = _run_relay(RequestState("r", None, PROMPT, params, tok), deltas)
    for got in (front, routed):
        assert got[0].prompt_logprobs == prompt_lps
        assert all(d.prompt_logprobs is None for d in got[1:])
    assert state.result(front[-1]).prompt_logprobs == prompt_lps
