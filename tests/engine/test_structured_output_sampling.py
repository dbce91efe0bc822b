"""Structured output applied by the sampler (the engine side of engine/structured_output.py): with
random weights the output still parses and validates, under greedy and seeded sampling, with the
overlap scheduler on, alone and batched with unconstrained requests; a bad constraint is refused at
admission with nothing kept."""
from __future__ import annotations

import json
import re

import pytest

from engine import LLM, SamplingParams
from engine.engine_core import RequestError

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "kind", "dims", "meta"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                         "kind": {"enum": ["box", "tube"]},
                         "dims": {"type": "array", "maxItems": 3, "items": {"type": "integer", "maximum": 50}},
                         "meta": {"type": "object", "additionalProperties": False, "required": ["ok"],
                                  "properties": {"ok": {"type": "boolean"},
                                                 "note": {"type": "string", "maxLength": 5}}}}}


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-llama", load_format="dummy", page_size=4, num_pages=512)


def test_json_schema_outputs_validate_greedy_and_sampled(llm):
    jsonschema = pytest.importorskip("jsonschema")
    constraint = ("json_schema", json.dumps(SCHEMA))
    params = [SamplingParams(temperature=0 if i % 2 else 0.9, seed=i, max_tokens=120, structured_output=constraint)
              for i in range(8)]
    prompts = [[5 + i, 17, 300 + i] for i in range(8)]
    free = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)  # batched with unconstrained ones
    outs = []
    for p, sp in zip(prompts, params):
        outs.append(llm.generate(prompt_token_ids=[p, [9, 9, 9]], sampling_params=[sp, free]))
    for (constrained, unconstrained) in outs:
        assert constrained.finish_reason == "stop", constrained.text
        jsonschema.validate(json.loads(constrained.text), SCHEMA)
        assert len(unconstrained.token_ids) == 6
    pool = llm.core.scheduler.block_pool
    assert pool.num_free_pages + llm.core.scheduler.radix.num_evictable_pages() == pool.num_pages


def test_regex_and_json_object(llm):
    out = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(
        temperature=0, max_tokens=20, structured_output=("regex", r"[0-9]{3}-[a-c]{2}")))[0]
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", out.text), out.text
    out = llm.generate(prompt_token_ids=[[8, 6, 7]], sampling_params=SamplingParams(
        temperature=0, max_tokens=60, structured_output=("json_object", "")))[0]
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:  # cut by max_tokens: still a prefix of one JSON object
        assert out.text.startswith("{")


def test_bad_constraint_is_refused_and_keeps_nothing(llm):
    with pytest.raises(RequestError, match="regex"):
        llm.core.add_request("bad", [5, 6], SamplingParams(max_tokens=4, structured_output=("regex", "[a-")))
    assert "bad" not in llm.core.requests and not llm.core.scheduler.waiting
    with pytest.raises(ValueError, match="structured_output"):
        SamplingParams(structured_output=("yaml", "x"))


def test_compiler_builds_off_the_request_path(llm, tmp_path, monkeypatch):
    """By default an engine starts its tokenizer's grammar compiler at construction, in the background, one
    per tokenizer per process: a constrained request after that pays only its own grammar, not the ~1 s
    tokenizer view that used to stall the engine's loop (and a decode node's KV reservations) on the first
    constrained request. With `PDSERVE_GRAMMAR_PREWARM=0` (this suite's setting, which `llm` was built
    under) the first constrained request starts it."""
    import time

    from engine.structured_output import compiler_future
    from engine.tokenizer import tokenizer_dir

    monkeypatch.setenv("PDSERVE_GRAMMAR_PREWARM", "1")
    core = LLM("tiny-llama", load_format="dummy", page_size=4, num_pages=64).core
    fut = core._grammars
    assert fut is not None  # started by the constructor
    directory = tokenizer_dir(core.config.tokenizer or core.model_config.path)
    assert compiler_future(directory, core.model_config.vocab_size, list(core.eos_token_ids)) is fut  # shared
    llm.core.add_request("lazy", [3, 4], SamplingParams(max_tokens=2, structured_output=("regex", "a")))
    llm.core.abort("lazy")
    assert llm.core._grammars is fut  # the fixture's engine (prewarm off) takes the same one on first use
    core.wait_grammar_compiler()  # what the engine process does before it reports ready
    assert fut.done()
    t = time.perf_counter()
    core.add_request("first-constrained", [3, 4, 5], SamplingParams(
        max_tokens=4, structured_output=("regex", r"[a-z]{2}")))
    took = time.perf_counter() - t
    core.abort("first-constrained")
    assert took < 0.5, f"admitting a constrained request took {took:.2f} s"

    broken = compiler_future(str(tmp_path), 1000, [1])  # no tokenizer.json there
    assert not broken.cancel()  # a waiter that gives up (a disconnected client) cannot cancel it for the others
    with pytest.raises(Exception, match="tokenizer"):
        broken.result(timeout=60)


def test_unbuildable_compiler_fails_only_constrained_requests(llm, monkeypatch):
    from concurrent.futures import Future

    failed = Future()
    failed.set_exception(ValueError("cannot load tokenizer (bad file)"))
    monkeypatch.setattr(llm.core, "_grammars", failed)
    llm.core.wait_grammar_compiler()  # a failed build does not stop the engine from starting
    with pytest.raises(RequestError, match="structured output is unavailable.*cannot load tokenizer"):
        llm.core.add_request("c", [3, 4], SamplingParams(max_tokens=2, structured_output=("regex", "a")))
    assert "c" not in llm.core.requests
    out = llm.generate(prompt_token_ids=[[3, 4]], sampling_params=SamplingParams(temperature=0, max_tokens=3,
                                                                                ignore_eos=True))[0]
    assert len(out.token_ids) == 3
