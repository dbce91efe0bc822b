"""The front's half of a request: turns the engine's token deltas into text deltas, applies stop
strings (which need text, so they live here and not in the engine loop) and assembles the final
result. Used by the in-process `LLM` and by the engine client across the process boundary."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.engine_core import EngineOutput
from engine.sampling_params import SamplingParams


@dataclass
class RequestOutput:
    """One delta (streaming) or the accumulated result (offline) of one request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # new ids of this delta, or all output ids for the final result
    text: str
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None
    error: str | None = None
    logprobs: list = field(default_factory=list)
    num_cached_tokens: int = 0
    # timings (monotonic seconds) for TTFT / TPOT accounting at the front
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    kv_transfer: dict | None = None  # prefill role: the KV sent for this request (bytes, seconds)
    queue_seconds: float | None = None  # on the first token's delta: waiting time before the first step
    prompt_logprobs: list | None = None  # per prompt token (None first), on the first delta when asked


class RequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.detok = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
            stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output) if tokenizer else None
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list = []
        self.prompt_logprobs: list | None = None
        self.finished = False
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None

    def process(self, out: EngineOutput) -> tuple[RequestOutput, bool]:
        """Apply one engine delta. Returns the text delta and whether a stop string ended the request
        (the caller must then abort it in the engine with status 'stop')."""
        delta_text = ""
        stopped_by_string = False
        if out.new_token_ids:
            if self.first_token_time is None:
                self.first_token_time = time.monotonic()
            self.token_ids.extend(out.new_token_ids)
            self.logprobs.extend(out.new_logprobs)
            self.prompt_logprobs = out.prompt_logprobs or self.prompt_logprobs
            if self.detok is not None:
                delta_text = self.detok.append(out.new_token_ids)
                self.text += delta_text
                stopped_by_string = self.detok.stopped and not out.finished
        finished = out.finished or stopped_by_string
        reason, stop_reason = out.finish_reason, out.stop_reason
        if self.detok is not None and self.detok.stopped:
            reason, stop_reason = "stop", self.detok.stop_reason
        if finished and self.detok is not None and not self.detok.stopped:
            tail = self.detok.flush() if hasattr(self.detok, "flush") else ""
            delta_text += tail
            self.text += tail
        self.finished = finished
        delta = RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids, list(out.new_token_ids), delta_text,
            finished=finished, finish_reason=reason if finished else None,
            stop_reason=stop_reason if finished else None, error=out.error,
            logprobs=list(out.new_logprobs), num_cached_tokens=out.num_cached_tokens,
            arrival_time=self.arrival_time, first_token_time=self.first_token_time,
            finish_time=time.monotonic() if finished else None, kv_transfer=out.kv_transfer,
            queue_seconds=out.queue_seconds, prompt_logprobs=out.prompt_logprobs)
        return delta, stopped_by_string

    def result(self, last: RequestOutput) -> RequestOutput:
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids, list(self.token_ids), self.text,
            finished=True, finish_reason=last.finish_reason, stop_reason=last.stop_reason, error=last.error,
            logprobs=list(self.logprobs), num_cached_tokens=last.num_cached_tokens,
            arrival_time=self.arrival_time, first_token_time=self.first_token_time, finish_time=last.finish_time,
            prompt_logprobs=self.prompt_logprobs)
