"""The front's half of a request, in one place: turns the engine's token deltas into text deltas,
applies stop strings (which need text, so they live here and not in the engine loop), counts the
usage and assembles the final result (one state per choice of an n > 1 request). Used by the in-process `LLM`, by the engine client across the
process boundary, and by the router over the nodes' token streams."""
from __future__ import annotations

import time

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class RequestState:
    """One request at the front: its detokenizer (with the stop strings), the ids and text so far."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer, index: int = 0):
        self.request_id = request_id
        self.index = index  # the choice of an n > 1 request this state follows
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.detok = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
            stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output) if tokenizer else None
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list = []
        self.prompt_logprobs: list | None = None  # per prompt token (None first), when asked
        self.finished = False
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None

    @property
    def stopped_by_string(self) -> bool:
        return self.detok is not None and self.detok.stopped

    def _append(self, out: RequestOutput) -> str:
        """Record a delta's ids; returns the text that became final with them (cut at a stop string)."""
        self.prompt_logprobs = out.prompt_logprobs or self.prompt_logprobs
        if not out.token_ids:
            return ""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs)
        text = self.detok.append(out.token_ids) if self.detok is not None else ""
        self.text += text
        return text

    def _flush(self) -> str:
        """At the end: the text held back (a possible stop string's start, an incomplete character)."""
        tail = self.detok.flush() if self.detok is not None else ""
        self.text += tail
        return tail

    def process(self, out: RequestOutput) -> tuple[RequestOutput, bool]:
        """Apply one engine delta. Returns the text delta and whether a stop string ended the request
        (the caller must then abort it in the engine with status 'stop')."""
        text = self._append(out)
        stopped = self.stopped_by_string and not out.finished
        finished = out.finished or stopped
        reason, stop_reason = out.finish_reason, out.stop_reason
        if self.stopped_by_string:
            reason, stop_reason = "stop", self.detok.stop_reason
        elif finished:
            text += self._flush()
        self.finished = finished
        delta = self._output(list(out.token_ids), list(out.logprobs), text, finished, reason, stop_reason,
                             out.error, out.num_cached_tokens)
        delta.kv_transfer, delta.queue_seconds = out.kv_transfer, out.queue_seconds
        delta.prompt_logprobs = out.prompt_logprobs
        return delta, stopped

    def relay(self, out: RequestOutput) -> list[RequestOutput]:
        """The router's form of a node's delta: the ids with their text (if any), then, once the request
        ended (by a stop string here, or at the node), a terminal delta without ids carrying the rest
        of the text and the usage."""
        deltas = []
        if out.token_ids:
            deltas.append(RequestOutput(self.request_id, list(out.token_ids), list(out.logprobs),
                                        prompt_logprobs=out.prompt_logprobs, text=self._append(out),
                                        index=self.index))
        if self.stopped_by_string:
            deltas.append(self.terminal("stop", self.detok.stop_reason, cached=out.num_cached_tokens))
        elif out.finished:
            tail = "" if out.finish_reason == "error" else self._flush()
            deltas.append(self.terminal(out.finish_reason, out.stop_reason, out.error, tail, out.num_cached_tokens))
        return deltas

    def terminal(self, reason: str, stop_reason: int | str | None = None, error: str | None = None,
                 text: str = "", cached: int = 0) -> RequestOutput:
        """The request's last delta, without new ids (it ended here, or after its last ids)."""
        self.finished = True
        return self._output([], [], text, True, reason, stop_reason, error, cached)

    def _output(self, token_ids, logprobs, text, finished, reason, stop_reason, error, cached) -> RequestOutput:
        return RequestOutput(
            self.request_id, token_ids, logprobs, finished=finished, finish_reason=reason if finished else None,
            stop_reason=stop_reason if finished else None, error=error,
            num_prompt_tokens=len(self.prompt_token_ids), num_cached_tokens=cached, text=text,
            num_output_tokens=len(self.token_ids), prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            arrival_time=self.arrival_time, first_token_time=self.first_token_time,
            finish_time=time.monotonic() if finished else None, index=self.index)

    def result(self, last: RequestOutput) -> RequestOutput:
        """The accumulated result, given the request's last delta."""
        out = self._output(list(self.token_ids), list(self.logprobs), self.text, True, last.finish_reason,
                           last.stop_reason, last.error, last.num_cached_tokens)
        out.finish_time, out.prompt_logprobs = last.finish_time, self.prompt_logprobs
        return out
