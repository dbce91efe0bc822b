"""`n` > 1 through `pdserve up` (router + prefill + decode on loopback, the `openai` client and gRPC):
n choices that are the offline engine's (greedy: all equal; seeded: choice i = a lone request with
seed + i, reproducible, different from each other), `index` on every chunk with a finish_reason
per choice, usage counting the prompt once, the decode node holding the prompt's pages once, and
the faults: bad `n` is a 4xx that leaves nothing behind, a cancelled or disconnected n > 1 stream
frees every page, a decode node killed mid-request ends every choice once."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import grpc
import pytest

from engine import LLM, SamplingParams
from proto import pdserve_pb2 as pb
from tests.cluster.conftest import OFFLINE_KW, Cluster, wait_for
from tests.cluster.test_cluster import _node_infos, _pools_full

MAX_SEQS = 8
PROMPT = [5, 17, 300, 42, 7, 99, 1000, 3, 8, 11]  # 10 tokens: a partly filled last page of 4
LONG = list(range(600, 662))  # 62 tokens: 15 full pages of 4 and a partial one


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(extra=["--max-num-seqs", str(MAX_SEQS)], env={"PDSERVE_GRAMMAR_PREWARM": "1"})  # constrained requests
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    from openai import OpenAI

    return OpenAI(base_url=cluster.http, api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def offline():
    return LLM("tiny-llama", **OFFLINE_KW)


def _decode_info(cluster):
    return next(i for i in _node_infos(cluster) if i.role == "decode")


def test_greedy_n3_gives_three_equal_choices_streamed_and_not(cluster, client, offline):
    ref = offline.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True))[0]
    kw = dict(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0, n=3, logprobs=1,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert sorted(c.index for c in full.choices) == [0, 1, 2]
    assert [c.model_extra["token_ids"] for c in full.choices] == [ref.token_ids] * 3
    assert len({c.text for c in full.choices}) == 1 and all(c.finish_reason == "length" for c in full.choices)
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(PROMPT), 3 * 8)
    texts, tokens, reasons, usage = {}, {}, {}, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens[c.index] = tokens.get(c.index, []) + (c.logprobs.tokens if c.logprobs else [])
            if c.finish_reason:
                assert c.index not in reasons, "a choice ended twice"
                reasons[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert reasons == {0: "length", 1: "length", 2: "length"}
    assert all(texts[c.index] == c.text and tokens[c.index] == c.logprobs.tokens for c in full.choices)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), 24)
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message == chat.choices[1].message
    assert chat.usage.completion_tokens == 8
    assert wait_for(lambda: _pools_full(cluster))


def test_seeded_n3_is_reproducible_its_choices_differ_and_equal_seed_plus_index(cluster, client, offline):
    lone = [offline.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
        temperature=1.0, seed=11 + i, max_tokens=8, ignore_eos=True))[0].token_ids for i in range(3)]
    kw = dict(model="tiny-llama", prompt=[PROMPT, PROMPT[:5]], max_tokens=8, temperature=1.0, seed=11, n=3,
              extra_body={"ignore_eos": True})
    first, second = client.completions.create(**kw), client.completions.create(**kw)
    ids = lambda out: [c.model_extra["token_ids"] for c in sorted(out.choices, key=lambda c: c.index)]
    assert ids(first) == ids(second)
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == list(range(6))
    assert ids(first)[:3] == lone  # prompt 0's choices are indices 0..2, prompt 1's 3..5 (OpenAI's numbering)
    assert len({tuple(t) for t in ids(first)[:3]}) == 3
    assert first.usage.prompt_tokens == len(PROMPT) + 5 and first.usage.completion_tokens == 6 * 8
    # the gRPC API: one stream, every delta names its choice, each choice ends once
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingParams(
        temperature=1.0, seed=11, max_tokens=8, ignore_eos=True, n=3))
    deltas = list(cluster.stub.Generate(req, timeout=120))
    per = {i: [t for d in deltas if d.index == i for t in d.token_ids] for i in range(3)}
    assert [per[i] for i in range(3)] == lone
    assert sorted(d.index for d in deltas if d.finished) == [0, 1, 2]


def test_decode_node_holds_the_prompt_pages_once(cluster):
    """A 62-token prompt is 16 pages of 4. With n = 4 choices the decode node holds the 15 full prompt
    pages once plus each choice's own copy of the partial page and its decode pages: at most
    15 + 4 * 9 pages (62 + 34 tokens each), where four separate prompts would need >= 64."""
    for _ in range(5):
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=LONG), sampling=pb.SamplingParams(
            temperature=1.0, seed=3, max_tokens=34, ignore_eos=True, n=4))
        call = cluster.stub.Generate(req, timeout=120)
        next(call)
        info = _decode_info(cluster)
        list(call)
        if info.num_running == 4:
            break
    assert info.num_running == 4, "the n = 4 request ended before the decode node could be asked"
    used = info.num_pages - info.num_free_pages
    assert 15 + 4 <= used <= 15 + 4 * 9 < 4 * 16
    assert wait_for(lambda: _pools_full(cluster))


def _post(cluster, body, path="/completions"):
    req = urllib.request.Request(cluster.http + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body,message", [
    ({"n": 0}, "n must be"),
    ({"n": MAX_SEQS + 1}, "max_num_seqs"),
    ({"n": 2.5}, "n must be"),
    ({"n": "3"}, "n must be"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"n": 3, "top_p": 0}, "top_p"),
    ({"n": 2, "temperature": -0.5}, "temperature"),
    # structured output: a bad schema, a bad regex, an unknown format, alone and with n > 1
    ({"n": 2, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ({"n": 3, "response_format": {"type": "yaml"}}, "response_format type"),
    ({"n": 2, "structured_outputs": {"regex": "[a-"}}, "cannot compile the regex"),
])
def test_bad_n_or_structured_output_is_a_400_and_leaves_nothing_behind(cluster, body, message):
    for path, base in (("/completions", {"prompt": PROMPT}), ("/chat/completions", {"messages": [
            {"role": "user", "content": "Hi"}]})):
        status, err = _post(cluster, {**base, "max_tokens": 4, **body}, path)
        assert status == 400 and message in err["error"]["message"], (path, err)
    for n in (0, MAX_SEQS + 1):
        with pytest.raises(grpc.RpcError) as e:
            cluster.generate(PROMPT, max_tokens=4, n=n)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wait_for(lambda: _pools_full(cluster))
    assert _router_in_flight(cluster) == 0


def _router_in_flight(cluster) -> float:
    with urllib.request.urlopen(cluster.http.rsplit("/v1", 1)[0] + "/metrics", timeout=30) as r:
        line = next(x for x in r.read().decode().splitlines() if x.startswith("pdserve:router_requests_in_flight"))
    return float(line.split()[-1])


def test_cancel_and_disconnect_mid_stream_free_every_page(cluster, client):
    calls = []
    for i in range(4):
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=LONG if i % 2 else PROMPT), sampling=pb.SamplingParams(
            temperature=1.0, seed=i, max_tokens=30, ignore_eos=True, n=3))
        calls.append(cluster.stub.Generate(req, timeout=120))
    for i, call in enumerate(calls):
        if i % 2:
            next(call)  # some mid-stream, others before their first token
        call.cancel()
    stream = client.completions.create(model="tiny-llama", prompt=LONG, max_tokens=30, n=4, temperature=1.0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.response.close()  # the client goes away mid-stream
    # and a structured-output request of n > 1 (a grammar matcher per choice) dropped mid-stream
    stream = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=30, n=2, temperature=1.0,
                                       stream=True, extra_body={"response_format": {"type": "json_object"}})
    next(iter(stream))
    stream.response.close()
    assert wait_for(lambda: _pools_full(cluster), timeout=60)
    out = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=4, n=2, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert len(out.choices) == 2 and out.usage.completion_tokens == 8


def test_decode_node_killed_during_n_requests_ends_each_choice_once_and_survivors_free_all():
    c = Cluster(num_decode=2, extra=["--max-num-seqs", str(MAX_SEQS)])
    try:
        reqs = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingParams(
            temperature=1.0, seed=i, max_tokens=80, ignore_eos=True, n=3)) for i in range(4)]
        calls = [c.stub.Generate(r, timeout=120) for r in reqs]
        for call in calls:
            next(call)
        os.killpg(c.pids["decode0"], signal.SIGKILL)
        t0 = time.monotonic()
        ends = [[d for d in call if d.finished] for call in calls]
        assert time.monotonic() - t0 < 60
        for finished in ends:  # every choice of every request: exactly one terminal status
            assert sorted(d.index for d in finished) == [0, 1, 2]
            assert {d.finish_reason for d in finished} <= {"length", "error"}
        assert "error" in {d.finish_reason for finished in ends for d in finished}
        assert wait_for(lambda: _pools_full(c), timeout=60)  # the nodes still answering hold no page
        toks, last = c.generate(PROMPT, max_tokens=4, n=2)
        assert last.finished and len(toks) == 8
    finally:
        c.stop()
    assert wait_for(lambda: not c.descendants(), timeout=30), "processes left behind"


def test_collocated_n_choices_equal_lone_requests_with_seed_plus_index(offline):
    lone = [offline.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
        temperature=1.0, seed=5 + i, max_tokens=6, ignore_eos=True))[0].token_ids for i in range(2)]
    c = Cluster(num_prefill=0)
    try:
        deltas = list(c.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingParams(
            temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, n=2)), timeout=120))
        assert [[t for d in deltas if d.index == i for t in d.token_ids] for i in range(2)] == lone
        assert sorted(d.index for d in deltas if d.finished) == [0, 1]
        assert wait_for(lambda: _pools_full(c))
    finally:
        c.stop()
