"""A request's state inside one engine: tokens, pages, progress and terminal status.

Invariants: `num_computed_tokens` tokens of `all_token_ids` have their KV in `page_ids`
(page `i` holds positions `i*page_size .. (i+1)*page_size-1`); a finished request holds no pages,
except a decode-role request that ended while a prefill node's WRITE may still target its pages:
the scheduler keeps those until the write's notice names it or its deadline passes.

A request with `n` > 1 choices is one request until its prompt is computed; then it forks (the
scheduler's `fork`): choices 1..n-1 become requests of their own (`choice_id`), sharing the
prompt's pages by reference count, each with its own output, seed, grammar and later pages.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # admitted, not yet scheduled (or preempted and waiting to recompute)
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # decode role: pages held, a prefill node writes them
    RUNNING = "running"
    SENDING_KV = "sending_kv"  # prefill role: computed; pages held until the KV push to the decode node ends
    FINISHED_STOPPED = "stop"  # EOS, stop token id or stop string
    FINISHED_LENGTH = "length"  # max_tokens or context limit
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self not in _LIVE


PENDING_TOKEN = -1  # an output token sampled by a step still in flight (overlap scheduling)

def choice_id(request_id: str, index: int) -> str:
    """The engine-internal id of choice `index` of a request (choice 0 keeps the request's own id)."""
    return request_id if index == 0 else f"{request_id}/choice{index}"


_LIVE = (RequestStatus.WAITING, RequestStatus.WAITING_FOR_REMOTE_KV, RequestStatus.RUNNING, RequestStatus.SENDING_KV)


@dataclass(eq=False)  # a request is itself: queue membership tests compare identity, not every field
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # engine.sampling_params.SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    eos_token_ids: tuple[int, ...] = ()

    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[Any] = field(default_factory=list)  # per output token, when requested
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    page_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prefix-cache hit at the last admission
    num_preemptions: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # KV hand-off (DESIGN.md "The request path"). Prefill role: `kv_dest` says where this request's
    # prompt KV goes; once computed it waits in SENDING_KV (pages held) with the status it ended
    # with in `kv_final_status`. Decode role: `kv_transfer_id` names the remote write that fills
    # its pages; `kv_deadline` bounds the wait (and, once it ended early, how long pages a WRITE
    # may still target stay held). `kv_push_started`: a WRITE from these pages may be in flight.
    kv_dest: dict | None = None
    kv_final_status: RequestStatus | None = None
    kv_push_started: bool = False
    kv_transfer_id: str | None = None
    kv_deadline: float = 0.0
    kv_transfer: dict | None = None  # bytes / seconds of the push, for the final output
    grammar: Any = None  # structured output: engine.structured_output.GrammarMatcher
    grammar_consumed: int = 0  # output tokens the matcher has advanced over
    # n > 1 (parallel sampling): which choice this is and the request it was forked from (its id
    # is what outputs carry); a parent lists its forks once its first step sampled.
    choice_index: int = 0
    group_id: str | None = None
    forks: list["Request"] = field(default_factory=list)

    @property
    def output_id(self) -> str:
        """The id the client knows: the forked-from request's for every choice."""
        return self.group_id or self.request_id

    @property
    def needs_fork(self) -> bool:
        """Its prompt's last chunk is due and it asked for more than one choice."""
        return getattr(self.sampling_params, "n", 1) > 1 and not self.forks and self.choice_index == 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """`all_token_ids[start:end]` without copying the whole sequence."""
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return self.output_token_ids[start - len(prompt): end - len(prompt)]
        return prompt[start:] + self.output_token_ids[: end - len(prompt)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.is_finished else None
