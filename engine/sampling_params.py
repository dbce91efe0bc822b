"""Per-request sampling and stopping parameters (vLLM's names and defaults), validated on
construction so a bad value is refused with a message that names the field.

`n` > 1 asks for n choices of one prompt (vLLM's parallel sampling): the prompt is computed once and
each choice then samples on its own; choice `i` draws with seed `seed + i` when a seed is given
(`for_choice`), so a seeded n-choice request is reproducible and its choices differ."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: until EOS or the context limit
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens present in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per output token (0 = only the sampled one)
    prompt_logprobs: int | None = None  # top-n logprobs per prompt token (computed at prefill, no prefix reuse)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # (kind, value): engine.structured_output's constraint — json_schema (schema as JSON text),
    # json_object, regex or grammar (Lark); the sampler masks every token the constraint forbids
    structured_output: tuple[str, str] | None = None
    n: int = 1  # choices per prompt, sharing the prompt's KV (choice i: seed + i)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, rule: str):
            raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "an integer >= 1 (or None)")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            bad("n", "an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"<= max_tokens ({self.max_tokens})")
        if not self.temperature >= 0.0:  # also refuses NaN
            bad("temperature", ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 or -1 = disabled)")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "in [0, 1]")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "> 0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "in [-2, 2]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "an integer or None")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "an integer in [0, 20] or None")
        if self.structured_output is not None:
            from engine.structured_output import KINDS

            so = self.structured_output
            if not (isinstance(so, (tuple, list)) and len(so) == 2 and so[0] in KINDS and isinstance(so[1], str)):
                bad("structured_output", f"a (kind, value) pair with kind one of {KINDS}")
            self.structured_output = (so[0], so[1])
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            bad("prompt_logprobs", "an integer in [0, 20] or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "a list of non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "non-negative token ids")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def for_choice(self, index: int) -> "SamplingParams":
        """The parameters of choice `index` of an n-choice request: one choice, seed + index."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameters: {', '.join(unknown)}")
        return cls(**d)
