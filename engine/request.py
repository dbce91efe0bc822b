"""A request's state inside one engine: tokens, pages, progress and terminal status.

Invariants: `num_computed_tokens` tokens of `all_token_ids` have their KV in `page_ids`
(page `i` holds positions `i*page_size .. (i+1)*page_size-1`); a finished request holds no pages.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # admitted, not yet scheduled (or preempted and waiting to recompute)
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, stop token id or stop string
    FINISHED_LENGTH = "length"  # max_tokens or context limit
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass
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
    kv_hold: bool = False  # prefill role: keep the pages after finishing until the KV is sent

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

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
