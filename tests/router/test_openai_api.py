"""The OpenAI surface of `pdserve up` through the `openai` client, on a tiny checkpoint carrying
Qwen3's real chat template and an API key: the chat prompt is exactly `transformers`' token ids,
logprobs come back in both shapes (streamed and not), `echo` returns the engine's own prompt
logprobs, a list of prompts is one batch, `usage` adds up, n = 2 choices each validate against a JSON
schema, and only /health and /metrics are open
without the key (HTTP 401, gRPC UNAUTHENTICATED)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest

from engine import LLM, SamplingParams
from proto import pdserve_pb2 as pb
from tests.cluster.conftest import OFFLINE_KW, Cluster
from router.chat_template import ChatTemplate
from tests.router.chat_checkpoints import build_chat_checkpoint

KEY = "sk-test-0123456789"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_chat_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3") / "ckpt")


@pytest.fixture(scope="module")
def cluster(checkpoint):
    c = Cluster(extra=["--model", checkpoint, "--api-key", KEY], env={"PDSERVE_GRAMMAR_PREWARM": "1"})  # constrained requests
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    from openai import OpenAI

    return OpenAI(base_url=cluster.http, api_key=KEY, max_retries=0)


def _http(cluster, path, body=None, key=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = cluster.http.rsplit("/v1", 1)[0] + path
    req = urllib.request.Request(url, json.dumps(body).encode() if body is not None else None, headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_every_public_route_but_health_and_metrics_needs_the_key(cluster):
    body = {"prompt": "hi", "max_tokens": 2}
    for path, payload in (("/v1/completions", body), ("/v1/chat/completions", {"messages": MESSAGES}),
                          ("/v1/models", None)):
        assert _http(cluster, path, payload) == 401
        assert _http(cluster, path, payload, key="wrong") == 401
    assert _http(cluster, "/v1/completions", body, key=KEY) == 200
    assert _http(cluster, "/health") == 200 and _http(cluster, "/metrics") == 200
    req = pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2))
    with pytest.raises(grpc.RpcError) as e:
        list(cluster.stub.Generate(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        list(cluster.stub.Generate(req, timeout=30, metadata=[("authorization", "Bearer nope")]))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    deltas = list(cluster.stub.Generate(req, timeout=60, metadata=[("authorization", f"Bearer {KEY}")]))
    assert deltas[-1].finished and deltas[-1].usage.completion_tokens >= 1
    req.sampling.prompt_logprobs = 2  # the gRPC API carries prompt logprobs too (tokens 1..n-1)
    req.text = "hello there, general Kenobi"
    deltas = list(cluster.stub.Generate(req, timeout=60, metadata=[("authorization", f"Bearer {KEY}")]))
    assert len(deltas[0].prompt_logprobs) == deltas[-1].usage.prompt_tokens - 1 > 3
    assert all(len(lp.top_logprobs) == 2 for lp in deltas[0].prompt_logprobs)


@pytest.mark.slow
@pytest.mark.parametrize("thinking", [True, False])
def test_chat_prompt_is_the_checkpoints_template_as_transformers_renders_it(cluster, client, checkpoint, thinking):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    expected = list(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, enable_thinking=thinking,
                                            tokenize=True)["input_ids"])
    chat = client.chat.completions.create(model=checkpoint, messages=MESSAGES, max_tokens=3, temperature=0,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": thinking},
                                                      "return_token_ids": True})
    assert chat.choices[0].model_extra["prompt_token_ids"] == expected
    assert chat.usage.prompt_tokens == len(expected)
    assert chat.usage.total_tokens == len(expected) + chat.usage.completion_tokens


@pytest.mark.slow
def test_chat_logprobs_streamed_and_not(client, checkpoint):
    kw = dict(model=checkpoint, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens == 5
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-5  # greedy: the best is the chosen
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = [i for c in chunks if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [i.token for i in streamed] == [i.token for i in content]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content], abs=1e-5)
    assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices


@pytest.mark.slow
def test_completion_batch_with_logprobs_echo_and_usage(client, checkpoint, cluster):
    prompts = ["The quick brown fox", [5, 17, 300, 42, 7]]
    out = client.completions.create(model=checkpoint, prompt=prompts, max_tokens=4, temperature=0, logprobs=2,
                                    echo=True, extra_body={"ignore_eos": True})
    assert [c.index for c in sorted(out.choices, key=lambda c: c.index)] == [0, 1]
    llm = LLM(checkpoint, **OFFLINE_KW)
    ids = [llm.tokenizer.encode(prompts[0]), prompts[1]]
    ref = llm.generate(prompt_token_ids=ids, sampling_params=SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=2))
    assert out.usage.prompt_tokens == sum(map(len, ids)) and out.usage.completion_tokens == 8
    for choice in out.choices:
        i = choice.index
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids[i]) + 4
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        engine_prompt = [e["logprob"] for e in ref[i].prompt_logprobs[1:]]
        assert lp.token_logprobs[1:len(ids[i])] == pytest.approx(engine_prompt, abs=1e-4)
        assert lp.token_logprobs[len(ids[i]):] == pytest.approx([e["logprob"] for e in ref[i].logprobs], abs=1e-4)
        assert choice.model_extra["token_ids"] == ref[i].token_ids
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert out.choices[[c.index for c in out.choices].index(0)].text.startswith(prompts[0])


@pytest.mark.slow
def test_streamed_batch_keeps_choices_apart(client, checkpoint):
    prompts = [[11, 12, 13], [400, 401, 402, 403]]
    kw = dict(model=checkpoint, prompt=prompts, max_tokens=6, temperature=0, logprobs=1,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    texts, tokens = {0: "", 1: ""}, {0: [], 1: []}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            tokens[c.index] += c.logprobs.tokens if c.logprobs else []
        usage = chunk.usage or usage
    for c in full.choices:
        assert texts[c.index] == c.text and tokens[c.index] == c.logprobs.tokens
    assert usage.prompt_tokens == 7 and usage.completion_tokens == 12


@pytest.mark.slow
def test_structured_output_is_validated_bad_schema_400(cluster):
    bad = {"messages": MESSAGES, "response_format": {"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}
    assert _http(cluster, "/v1/chat/completions", bad, key=KEY) == 400
    assert _http(cluster, "/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "[a-"}}, key=KEY) == 400
    good = {"prompt": "x", "response_format": {"type": "json_object"}, "max_tokens": 40}
    assert _http(cluster, "/v1/completions", good, key=KEY) == 200


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "owner", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "kind": {"enum": ["cat", "dog", "fish"]},
                         "owner": {"type": "object", "additionalProperties": False, "required": ["age", "vip"],
                                   "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                  "vip": {"type": "boolean"}}},
                         "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "c"]}}}}


@pytest.mark.slow
def test_json_schema_output_validates_with_random_weights_streamed_and_not(client):
    """20 requests (greedy and seeded sampling, half streamed) under a schema with nested objects,
    arrays, enums and required fields: every output parses and validates; the mask runs on the
    prefill node (first token) and on the decode node (the rest)."""
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    for i in range(20):
        kw = dict(model=client.models.list().data[0].id, messages=MESSAGES + [{"role": "user", "content": f"pet {i}"}],
                  max_tokens=120, response_format=fmt, temperature=0 if i % 2 else 1.0, seed=i)
        if i % 4 < 2:
            text = client.chat.completions.create(**kw).choices[0].message.content
        else:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        obj = json.loads(text)
        jsonschema.validate(obj, SCHEMA)  # raises on any violation
        assert set(obj) == set(SCHEMA["required"]) and obj["kind"] in ("cat", "dog", "fish")


@pytest.mark.slow
def test_json_schema_with_n2_validates_every_choice_streamed_and_not(client, cluster):
    """n = 2 choices under one schema: each choice has its own grammar matcher (on the prefill node for
    its first token, on the decode node after the fork), so each output validates on its own."""
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    kw = dict(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=120, response_format=fmt,
              temperature=1.0, seed=9, n=2)
    full = client.chat.completions.create(**kw)
    texts = {c.index: c.message.content for c in full.choices}
    streamed: dict = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert sorted(texts) == sorted(streamed) == [0, 1] and streamed == texts  # seeded: the same twice
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)  # raises on any violation
    bad = {"messages": MESSAGES, "n": 2, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}
    assert _http(cluster, "/v1/chat/completions", bad, key=KEY) == 400


_LL_TASK = """task: pdserve_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
_GEN_TASK = """task: pdserve_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["###"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow
def test_lm_eval_loglikelihood_and_generate_until_tasks(cluster, checkpoint, tmp_path, monkeypatch):
    """lm-evaluation-harness's local-completions and local-chat-completions models with their defaults, on
    local YAML tasks and data; every loglikelihood it reports equals the engine's own prompt logprobs of
    the same tokens."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = [{"question": "The capital of France is", "choices": [" Paris", " Rome", " a city of light"], "answer": 0},
            {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
            {"question": "Cats chase", "choices": [" mice", " cars", " their own tails"], "answer": 2}]
    with open(tmp_path / "ll.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(tmp_path / "gen.jsonl", "w") as f:
        f.writelines(json.dumps({"question": d["question"], "answer": d["choices"][0]}) + "\n" for d in docs)
    (tmp_path / "ll.yaml").write_text(_LL_TASK.format(data=tmp_path / "ll.jsonl"))
    (tmp_path / "gen.yaml").write_text(_GEN_TASK.format(data=tmp_path / "gen.jsonl"))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # the defaults: 15 s of indexing
    model_args = {"model": checkpoint, "base_url": f"{cluster.http}/completions", "tokenizer_backend": "huggingface",
                  "tokenizer": checkpoint, "max_length": 96}
    out = lm_eval.simple_evaluate(model="local-completions", model_args=model_args,
                                  tasks=["pdserve_ll", "pdserve_gen"], task_manager=tasks,
                                  log_samples=True)
    assert set(out["results"]) == {"pdserve_ll", "pdserve_gen"}
    assert len(out["samples"]["pdserve_gen"]) == 3 and 0.0 <= out["results"]["pdserve_gen"]["exact_match,none"] <= 1
    chat = lm_eval.simple_evaluate(model="local-chat-completions", apply_chat_template=True,
                                   model_args={"model": checkpoint, "base_url": f"{cluster.http}/chat/completions"},
                                   tasks=["pdserve_gen"], task_manager=tasks,
                                   log_samples=True)
    llm = LLM(checkpoint, **OFFLINE_KW)
    template = ChatTemplate.load(checkpoint)
    for sample in chat["samples"]["pdserve_gen"]:  # the chat path: template, then greedy decoding
        ids = template.encode(llm.tokenizer, [{"role": "user", "content": sample["doc"]["question"]}])
        ref = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(temperature=0, max_tokens=6,
                                                                                   stop=["###"]))[0]
        assert sample["resps"][0][0] == ref.text and ref.text
    lm = get_model("local-completions")(**model_args)
    scored = 0
    for sample in out["samples"]["pdserve_ll"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            ctx, cont = lm._encode_pair(context, continuation)
            ref = llm.generate(prompt_token_ids=[ctx + cont], sampling_params=SamplingParams(
                temperature=0, max_tokens=1, prompt_logprobs=1))[0].prompt_logprobs
            expected = sum(e["logprob"] for e in ref[len(ctx):])
            assert resp[0][0] == pytest.approx(expected, abs=1e-3)
            scored += 1
    assert scored == 8
