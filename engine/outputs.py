"""`RequestOutput`: the one type a request's results travel in, from the engine loop to the client.

The engine loop fills the token-level fields (new ids, logprobs, finish, counts); the front that
detokenizes (`engine/output_processor.py`, used by `LLM`, `EngineClient` and the router) fills the
text, the usage and its timings. Deltas stream; an offline result is one accumulated output.
Across gRPC the same facts travel as the proto `GenerateResponse` (proto/convert.py maps them).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """One delta of one request (streaming), or its accumulated result (offline `generate`)."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)  # new ids of this delta; all ids in a result
    logprobs: list = field(default_factory=list)  # one entry per id in `token_ids` (when asked for)
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    kv_transfer: dict | None = None  # prefill role: the KV sent for this request (bytes, seconds)
    queue_seconds: float | None = None  # on the first token's delta: arrival -> first scheduled step
    prompt_logprobs: list | None = None  # per prompt token (None first), on the first delta when asked
    index: int = 0  # which choice of an n > 1 request (each choice ends with its own finished delta)
    # Filled by the front.
    text: str = ""
    num_output_tokens: int = 0  # tokens generated so far (the usage's completion tokens)
    prompt: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    arrival_time: float = 0.0  # monotonic seconds, for TTFT / TPOT at the front
    first_token_time: float | None = None
    finish_time: float | None = None

    def usage(self) -> dict[str, int]:
        """OpenAI's `usage` object of a finished request."""
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": self.num_output_tokens,
                "total_tokens": self.num_prompt_tokens + self.num_output_tokens}
