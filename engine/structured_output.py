"""Structured output's grammar side: a request's constraint (OpenAI `response_format` json_schema /
json_object, or vLLM-style `structured_outputs` regex / Lark grammar) compiled with llguidance into
a per-request matcher that gives a token bitmask for each step and advances on the sampled token.

It owns compiling and validating constraints against a tokenizer (a bad schema or regex raises
`StructuredOutputError`, an HTTP 400) and the per-request state; it does not touch the sampler.
Applying the mask is `apply_token_bitmask` (torch reference, logits of disallowed tokens to -inf);
the sampler calls it, the prefill node for the first token and the decode node for the rest, the
bitmask being 32 tokens per int32 word, token i at bit i % 32 of word i // 32 (llguidance's layout).

Engine side: a request with `SamplingParams.structured_output` holds a matcher (`Request.grammar`);
`step_bitmask` advances each matcher over the output tokens it has not seen (the first one may come
from the prefill node) and fills the step's mask. Its tokens' values must be known on the host, so
such a request's steps wait for the step in flight (no overlap), as penalties do.
"""
from __future__ import annotations

import functools
import json
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a mask is made: the router imports this module without it
    import torch

KINDS = ("json_schema", "json_object", "regex", "grammar")
_JSON_OBJECT_SCHEMA = {"type": "object"}
# json.dumps' separators and no free whitespace: a model with unconstrained whitespace can pad forever
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputError(ValueError):
    """The constraint is malformed or cannot be compiled (a client error)."""


@dataclass(frozen=True)
class StructuredOutputSpec:
    kind: str  # one of KINDS
    value: str  # the JSON schema as JSON text, the regex, or the Lark grammar ("" for json_object)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise StructuredOutputError(f"structured output kind must be one of {KINDS}, got {self.kind!r}")

    @classmethod
    def from_request(cls, body: dict) -> "StructuredOutputSpec | None":
        """The constraint of an OpenAI request body, or None. `response_format` follows OpenAI
        (`text`, `json_object`, `json_schema` with `json_schema.schema`); `structured_outputs`
        takes one of `json`, `regex`, `grammar` (vLLM's names)."""
        fmt, extra = body.get("response_format"), body.get("structured_outputs")
        if fmt is not None and extra is not None:
            raise StructuredOutputError("give response_format or structured_outputs, not both")
        if fmt is not None:
            return cls._from_response_format(fmt)
        if extra is None:
            return None
        if not isinstance(extra, dict) or len([k for k in ("json", "regex", "grammar") if k in extra]) != 1:
            raise StructuredOutputError("structured_outputs must be an object with exactly one of json, regex, grammar")
        if "json" in extra:
            return cls("json_schema", _schema_text(extra["json"]))
        key = "regex" if "regex" in extra else "grammar"
        if not isinstance(extra[key], str) or not extra[key]:
            raise StructuredOutputError(f"structured_outputs.{key} must be a non-empty string")
        return cls(key, extra[key])

    @classmethod
    def _from_response_format(cls, fmt) -> "StructuredOutputSpec | None":
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise StructuredOutputError("response_format must be an object with a type")
        kind = fmt["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object", "")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise StructuredOutputError("response_format json_schema needs json_schema.schema")
            return cls("json_schema", _schema_text(spec["schema"]))
        raise StructuredOutputError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


def _schema_text(schema) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise StructuredOutputError("a JSON schema must be an object (or a boolean)")
    _check_schema(schema)
    return json.dumps(schema, sort_keys=True)


def _check_schema(schema) -> None:
    """Refuse what is not a JSON schema at all (llguidance then checks what it can express)."""
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        raise StructuredOutputError(f"invalid JSON schema: {e.message}") from None


class GrammarCompiler:
    """Compiles constraints for one tokenizer (building its llguidance view takes ~1 s: once per process)."""

    def __init__(self, tokenizer_json: str, vocab_size: int | None = None, eos_token_ids: list[int] | None = None):
        import llguidance

        self._ll = llguidance
        with open(tokenizer_json) as f:
            text = f.read()
        self.tokenizer = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=eos_token_ids or None)
        self.vocab_size = self.tokenizer.vocab_size
        self._grammar = functools.lru_cache(maxsize=256)(self._compile)

    @classmethod
    def for_tokenizer_dir(cls, directory: str, vocab_size: int | None = None,
                          eos_token_ids: list[int] | None = None) -> "GrammarCompiler":
        return cls(os.path.join(directory, "tokenizer.json"), vocab_size, eos_token_ids)

    def _compile(self, spec: StructuredOutputSpec) -> str:
        m = self._ll.LLMatcher
        try:
            if spec.kind == "json_schema":
                grammar = m.grammar_from_json_schema(spec.value, defaults=_JSON_OPTIONS)
            elif spec.kind == "json_object":
                grammar = m.grammar_from_json_schema(_JSON_OBJECT_SCHEMA, defaults=_JSON_OPTIONS)
            elif spec.kind == "regex":
                grammar = m.grammar_from_regex(spec.value)
            else:
                grammar = m.grammar_from_lark(spec.value)
        except ValueError as e:
            raise StructuredOutputError(f"cannot compile the {spec.kind}: {e}") from None
        error = m.validate_grammar(grammar, self.tokenizer)
        if error:
            raise StructuredOutputError(f"cannot compile the {spec.kind}: {error.strip()}")
        return grammar

    def validate(self, spec: StructuredOutputSpec) -> None:
        """Raises StructuredOutputError when `spec` cannot constrain generation (router-side check)."""
        self._grammar(spec)

    def matcher(self, spec: StructuredOutputSpec) -> "GrammarMatcher":
        return GrammarMatcher(self._ll.LLMatcher(self.tokenizer, self._grammar(spec), log_level=0), self.vocab_size)


def prewarm_enabled() -> bool:
    """Whether engines and routers start building their grammar compiler at start (the default) rather than
    on the first constrained request (`PDSERVE_GRAMMAR_PREWARM=0`: about a second of CPU saved per process
    that never sees one; the test suite's many short-lived clusters set it)."""
    return os.environ.get("PDSERVE_GRAMMAR_PREWARM", "1") != "0"


_COMPILERS: dict[tuple, Future] = {}
_COMPILERS_LOCK = threading.Lock()


def compiler_future(directory: str | None, vocab_size: int | None = None,
                    eos_token_ids: list[int] | None = None) -> Future:
    """This process's `GrammarCompiler` for one tokenizer, built once in a background thread started by
    the first call (an engine or the router calls this at start, long before a constrained request, unless
    `prewarm_enabled()` says not to).
    Building it holds the GIL for about a second in one piece (the tokenizer's llguidance view, Rust code
    that does not release it: measured 0.9 s on this project's CPU machine), so built on a request's path
    it stalled every other request of that engine or router, a decode node's KV reservations included.
    The future's `result()` is the compiler, or raises what building it raised (a missing llguidance, a
    broken tokenizer.json)."""
    key = (directory, vocab_size, tuple(eos_token_ids or ()))
    with _COMPILERS_LOCK:
        fut = _COMPILERS.get(key)
        if fut is None:
            fut = _COMPILERS[key] = Future()
            fut.set_running_or_notify_cancel()  # running: no waiter can cancel the one compiler all share
            threading.Thread(target=_build_compiler, args=(fut, key), name="grammar-compiler", daemon=True).start()
    return fut


def _build_compiler(fut: Future, key: tuple) -> None:
    directory, vocab_size, eos = key
    try:
        if directory is None:
            raise ValueError("no tokenizer directory to build the grammar compiler from")
        fut.set_result(GrammarCompiler.for_tokenizer_dir(directory, vocab_size, list(eos) or None))
    except BaseException as e:  # handed to whoever asks for the compiler
        fut.set_exception(e)


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        self._m = matcher
        self.vocab_size = vocab_size
        self.num_words = (vocab_size + 31) // 32

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed next tokens into row `row` of an int32 CPU tensor [batch, num_words]."""
        import torch

        target = bitmask[row]
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not target.is_contiguous():
            raise ValueError("the bitmask must be a contiguous int32 CPU tensor of shape [batch, num_words]")
        if target.numel() != self.num_words:
            raise ValueError(f"bitmask rows hold {target.numel()} words, the vocabulary needs {self.num_words}")
        self._m.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def bitmask(self) -> torch.Tensor:
        import torch

        out = torch.empty(1, self.num_words, dtype=torch.int32)
        self.fill_bitmask(out)
        return out[0]

    def allowed_token_ids(self) -> list[int]:
        bits = np.unpackbits(self.bitmask().numpy().view(np.uint8), bitorder="little")[: self.vocab_size]
        return np.nonzero(bits)[0].tolist()

    def accept(self, token_id: int) -> bool:
        """Advance on a sampled token; False (and the matcher stays in error) when it was not allowed."""
        return self._m.consume_token(int(token_id))

    def fork(self) -> "GrammarMatcher":
        """An independent matcher at this one's position (another choice of an n > 1 request)."""
        return GrammarMatcher(self._m.deep_copy(), self.vocab_size)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last tokens (speculative decoding's rejected drafts)."""
        if not self._m.rollback(num_tokens):
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self._m.get_error()}")

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and nothing more may follow (only EOS is allowed, or it stopped)."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


def step_bitmask(requests: list) -> torch.Tensor | None:
    """The int32 mask `[rows, words]` of one sampling step (rows without a constraint allow
    everything), after advancing each constrained request's matcher over its new output tokens;
    None when no row is constrained."""
    rows = [(i, r) for i, r in enumerate(requests) if getattr(r, "grammar", None) is not None]
    if not rows:
        return None
    import torch

    mask = torch.full((len(requests), rows[0][1].grammar.num_words), -1, dtype=torch.int32)
    for i, r in rows:
        for token in r.output_token_ids[r.grammar_consumed:]:
            r.grammar.accept(token)  # allowed by the mask it was drawn under
        r.grammar_consumed = r.num_output_tokens
        r.grammar.fill_bitmask(mask, i)
    return mask


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Torch reference: logits [batch, vocab] with disallowed tokens set to -inf (in place, returned).
    Tokens past the bitmask's 32 × words are disallowed."""
    import torch

    batch, vocab = logits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.to(torch.int32)[:, :, None] >> shifts) & 1).reshape(batch, -1)
    allowed = torch.zeros(batch, vocab, dtype=torch.bool, device=logits.device)
    n = min(vocab, bits.shape[1])
    allowed[:, :n] = bits[:, :n].to(device=logits.device, dtype=torch.bool)
    return logits.masked_fill_(~allowed, float("-inf"))
