"""One request's path through the cluster, as the router drives it (DESIGN.md, "The request path").

1. Validate and tokenize; pick a decode node D and open its `Decode` stream: D reserves KV pages
   and answers first with the KV destination (NIXL agent, layer addresses, pages, layout,
   transfer id).
2. At the same time pick a prefill node P and send it the prompt, its destination to follow
   (SGLang's bootstrap: D's reservation overlaps P's prefill); hand P the destination when D
   answers. P prefills, samples the first token, WRITEs the KV into D's pages (layers computed
   before the destination came go out when it does), notifies D (transfer id + first token) and
   answers.
3. D joins the request to its batch when that notice arrives; its stream carries the tokens from
   the second on, detokenized here with stop strings applied (engine/output_processor.py's
   `RequestState`, as in every front).

A request of n > 1 choices takes the same path once: P samples every choice's first token and
sends the KV once, D forks the choices over the shared prompt pages and streams them, each delta
naming its choice (`index`); here each choice has its own `RequestState` (stop strings end one
choice: D is told to abort that choice only) and the request ends when its last choice has.

Two calls per request, and cancelling them is its one abort path: D's stream and P's call each
abort their node's side. Every wait is bounded. A prefill node that fails before anything was
streamed is retried once on another node with a fresh D stream (the first one is cancelled; its
pages stay held on D until P's abandon notice or a timeout, and the retry's notice names a new
transfer id); any later failure ends the request with an error. Every request ends with exactly
one terminal delta.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from engine.output_processor import RequestState
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from proto import convert
from proto import pdserve_pb2 as pb
from router.registry import NoNodeAvailable, NodeHandle, Registry

log = logging.getLogger(__name__)


def _layout_diff(a: pb.KVLayout, b: pb.KVLayout) -> str:
    return "; ".join(f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
                     for f in pb.KVLayout.DESCRIPTOR.fields if getattr(a, f.name) != getattr(b, f.name))


_ATTEMPTS = 2  # a prefill that fails before anything streamed is retried once on another node


def _attempt_id(rid: str, attempt: int) -> str:
    return rid if attempt == 0 else f"{rid}.retry{attempt}"


class BadRequest(ValueError):
    """The client's request is invalid (maps to INVALID_ARGUMENT / HTTP 400)."""


@dataclass
class _Timing:
    """A request's latencies as the client sees them; with n > 1 choices, those of choice 0 (the
    choices step together), and the tokens of every choice."""
    start: float
    ttft: float | None = None
    last: float = 0.0
    num_tokens: int = 0
    itls: list = field(default_factory=list)
    all_tokens: int = 0

    def on_delta(self, delta: RequestOutput, now: float) -> None:
        self.all_tokens += len(delta.token_ids)
        if delta.token_ids and delta.index == 0:
            if self.ttft is None:
                self.ttft = now - self.start
            else:
                self.itls.append(now - self.last)
            self.num_tokens += len(delta.token_ids)
            self.last = now
        if delta.finished and not self.last:
            self.last = now


@dataclass
class Timeouts:
    reserve_s: float = 10.0  # until D answers with the KV destination
    prefill_s: float = 300.0
    decode_s: float = 600.0


class Router:
    def __init__(self, registry: Registry, tokenizer, model_name: str, policy: str = "least_load",
                 timeouts: Timeouts | None = None, max_in_flight: int = 1024, metrics=None,
                 collocated: bool = False):
        self.registry = registry
        # Collocated: no prefill nodes; each request runs whole on one decode node (the baseline
        # disaggregation is compared against at equal GPU count).
        self.collocated = collocated
        self.metrics = metrics  # engine.metrics.ServingMetrics (role router), or None
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.policy = policy
        self.timeouts = timeouts or Timeouts()
        self.max_in_flight = max_in_flight
        self.tasks: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()  # per-choice aborts, late destinations
        self._ids = itertools.count()
        self.stats = {"requests": 0, "finished": 0, "errors": 0, "aborted": 0, "kv_bytes": 0, "retries": 0}

    # ------------------------------------------------------------- validation
    def prepare(self, prompt: str | None, prompt_ids: list[int] | None, params: SamplingParams) -> list[int]:
        if (prompt is None) == (prompt_ids is None):
            raise BadRequest("give exactly one of a text prompt or prompt token ids")
        ids = self.tokenizer.encode(prompt) if prompt is not None else [int(t) for t in prompt_ids]
        if not ids:
            raise BadRequest("the prompt is empty")
        nodes = self.registry.of("decode") or self.registry.of("decode", alive_only=False)
        limit = min((n.info.max_model_len for n in nodes if n.info), default=None)
        if limit is not None and len(ids) >= limit:
            raise BadRequest(f"prompt of {len(ids)} tokens leaves no room to generate within the context "
                             f"limit of {limit} tokens")
        if any(t < 0 for t in ids):
            raise BadRequest("token ids must be non-negative")
        max_n = min((n.info.max_num_seqs for n in nodes if n.info and n.info.max_num_seqs), default=None)
        if max_n is not None and params.n > max_n:
            raise BadRequest(f"n = {params.n} choices exceed the decode nodes' max_num_seqs ({max_n})")
        return ids

    def new_id(self) -> str:
        return f"cmpl-{uuid.uuid4().hex[:16]}"

    # ------------------------------------------------------------- the path
    async def generate(self, request_id: str, ids: list[int], params: SamplingParams, prompt: str | None = None):
        """Async iterator of RequestOutput deltas (text filled in); each choice's last one has
        `finished` set and carries its usage (the request ends with its last choice)."""
        states = [RequestState(request_id, prompt, ids, params, self.tokenizer, index=i) for i in range(params.n)]
        if len(self.tasks) >= self.max_in_flight:
            for state in states:
                yield self._count(state.terminal("error", error="overloaded: too many requests in flight"))
            return
        self.stats["requests"] += 1
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        task = asyncio.create_task(self._run(states, queue))
        self.tasks[request_id] = task
        timing = _Timing(time.monotonic())
        open_choices = len(states)
        try:
            while True:
                delta = await queue.get()
                timing.on_delta(delta, time.monotonic())
                open_choices -= delta.finished
                if not open_choices:
                    self._observe(timing, delta, len(ids))
                yield delta
                if not open_choices:
                    return
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
            self.tasks.pop(request_id, None)

    def _observe(self, timing: "_Timing", final: RequestOutput, num_prompt_tokens: int) -> None:
        """Client-side latencies of one finished request into the router's histograms."""
        m = self.metrics
        if m is None:
            return
        reason = final.finish_reason or "error"
        if reason == "error":
            kind = "overloaded" if (final.error or "").startswith("overloaded") else "failed"
            m.inc("request_failure_total", reason=kind)
            return
        if reason == "abort":
            m.inc("request_success_total", finished_reason="abort")
            return
        m.observe_request(timing.ttft, timing.last - timing.start, timing.num_tokens, timing.itls,
                          num_prompt_tokens, reason, total_output_tokens=timing.all_tokens)

    def abort(self, request_id: str) -> bool:
        task = self.tasks.get(request_id)
        if task is None:
            return False
        task.cancel()
        return True

    def _count(self, final: RequestOutput) -> RequestOutput:
        self.stats[{"error": "errors", "abort": "aborted"}.get(final.finish_reason, "finished")] += 1
        return final

    def _put(self, states: list[RequestState], out: asyncio.Queue, deltas: list[RequestOutput]) -> bool:
        """Queue deltas for the client, counting the request's end; True once every choice ended."""
        ended = all(s.finished for s in states)
        for d in deltas:
            out.put_nowait(self._count(d) if d.finished and ended and d is deltas[-1] else d)
        return ended

    def _end(self, states: list[RequestState], out: asyncio.Queue, reason: str, error: str | None = None) -> None:
        """One terminal delta for every choice still open."""
        self._put(states, out, [s.terminal(reason, error=error) for s in states if not s.finished])

    async def _run(self, states: list[RequestState], out: asyncio.Queue) -> None:
        calls: list = []  # this request's open node streams; cancelling them aborts it on those nodes
        try:
            await self._path(states, out, calls)
        except asyncio.CancelledError:
            self._end(states, out, "abort")
            raise
        except NoNodeAvailable as e:
            self._end(states, out, "error", f"overloaded: {e}")
        except Exception as e:  # noqa: BLE001 — every request ends with one terminal status
            log.exception("request %s failed", states[0].request_id)
            self._end(states, out, "error", f"{type(e).__name__}: {e}")
        finally:
            for call in calls:
                call.cancel()

    async def _open_decode(self, rid: str, ids: list[int], params: SamplingParams, calls: list, opened: list):
        """Open D's `Decode` stream; returns (node, stream, KV destination) once D has reserved. The
        stream and the read of its first message are also put in `opened` as soon as they exist: the
        read is shielded (cancelling a read cancels the call), for `_handoff`'s cancellation."""
        node = self.registry.pick("decode", "least_load")
        req = pb.DecodeRequest(request_id=rid, prompt_token_ids=ids, sampling=convert.params_to_proto(params))
        call = node.stub.Decode(req, timeout=self.timeouts.decode_s)
        calls.append(call)
        read = asyncio.ensure_future(call.read())
        read.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if nobody waits
        opened += [call, read]
        try:
            first = await asyncio.wait_for(asyncio.shield(read), self.timeouts.reserve_s)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError) as e:
            call.cancel()
            self.registry.mark_dead(node)
            why = e.code().name if isinstance(e, grpc.aio.AioRpcError) else "timeout"
            raise NoNodeAvailable(f"decode node {node.address} did not answer ({why})") from None
        if first is grpc.aio.EOF or not first.HasField("destination"):
            call.cancel()
            raise RuntimeError(f"decode node {node.address} answered without a KV destination")
        if first.destination.error:
            call.cancel()
            raise NoNodeAvailable(f"decode node {node.address}: {first.destination.error}")
        return node, call, first.destination

    async def _pick_prefill(self, ids, tried: set) -> NodeHandle:
        remote = await self.registry.prefix_matches(ids) if self.policy == "prefix_aware" else None
        node = self.registry.pick("prefill", self.policy, ids, exclude=tried, remote=remote)
        tried.add(node)
        if self.policy == "prefix_aware":
            await self.registry.record_prefix(node, ids)
        return node

    async def _prefill(self, node: NodeHandle, rid, ids, params, head: asyncio.Future) -> pb.PrefillResponse:
        """P's Prefill stream, its destination to follow (`_hand_destination`): its first tokens resolve
        `head` the moment P sampled them; returns P's end (after the KV push)."""
        node.in_flight += 1
        call = None
        try:
            req = pb.PrefillRequest(request_id=rid, prompt_token_ids=ids, sampling=convert.params_to_proto(params),
                                    destination_follows=True)
            call = node.stub.Prefill(req, timeout=self.timeouts.prefill_s)
            while (msg := await call.read()) is not grpc.aio.EOF:
                if not msg.head:
                    return msg
                if not head.done():
                    head.set_result(msg)
            raise RuntimeError(f"prefill node {node.address} ended its stream without a final status")
        finally:
            if call is not None:
                call.cancel()  # a no-op once it ended; otherwise P aborts the request
            node.in_flight -= 1
            node.served += 1

    async def _hand_destination(self, node: NodeHandle, dest: pb.KVDestination) -> None:
        if node.info is not None and node.info.layout != dest.layout:
            raise RuntimeError(f"KV layouts of prefill node {node.address} and the decode node differ "
                               f"({_layout_diff(node.info.layout, dest.layout)}); refusing to transfer")
        await node.stub.SetDestination(dest, timeout=self.timeouts.reserve_s)

    async def _handoff(self, rid, ids, params, tried: set, calls: list):
        """One attempt: P starts the prompt while D reserves; P gets D's destination when it comes.
        Returns (D, D's stream, P's first message, P's call task): the first message is P's head (its
        first tokens; the task then still waits for P's end, after the push) or P's end. P's call is
        cancelled (aborting it there) if D fails."""
        prefill = await self._pick_prefill(ids, tried)
        head = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(self._prefill(prefill, rid, ids, params, head))
        opened: list = []  # D's stream, once open
        dest, handed, keep = None, False, False
        try:
            decode, call, dest = await self._open_decode(rid, ids, params, calls, opened)
            if not task.done():
                await self._hand_destination(prefill, dest)
            else:  # P ended first (refused, failed): handed over anyway, P tells D to free its pages now
                try:
                    await self._hand_destination(prefill, dest)
                except (grpc.aio.AioRpcError, RuntimeError) as e:
                    log.info("destination of %s not handed to %s after it ended: %s", rid, prefill.address, e)
            handed = True
            await asyncio.wait({head, task}, return_when=asyncio.FIRST_COMPLETED)
            if not head.done():
                return decode, call, task.result(), task
            keep = True  # P's end is awaited with D's stream (`_stream`)
            return decode, call, head.result(), task
        except asyncio.CancelledError:
            if opened and not handed:  # the client left while D reserved or its destination travelled to P
                calls.remove(opened[0])
                self._in_background(self._late_destination(prefill, *opened, dest))
            raise
        finally:
            if not task.done() and not keep:  # D refused or failed, or we were cancelled: P stops too
                task.cancel()
            elif task.done() and not task.cancelled():
                task.exception()  # retrieved: the caller has P's failure, or a failure of D's ended it

    async def _path(self, states: list[RequestState], out: asyncio.Queue, calls: list) -> None:
        state = states[0]
        rid, ids, params = state.request_id, state.prompt_token_ids, state.params
        if self.collocated:
            node = self.registry.pick("decode", self.policy, ids)
            req = pb.DecodeRequest(request_id=rid, prompt_token_ids=ids, sampling=convert.params_to_proto(params))
            call = node.stub.Generate(req, timeout=self.timeouts.decode_s)
            calls.append(call)
            await self._stream(states, node, rid, call, out, 0, unwrap=False)
            return
        tried: set = set()
        for attempt in range(_ATTEMPTS):
            # A retry gets its own node-level id: D may still be dropping the first attempt's request
            # when the retry arrives there (its cancellation travels on its own).
            node_rid = _attempt_id(rid, attempt)
            try:
                decode, call, first, prefill_end = await self._handoff(node_rid, ids, params, tried, calls)
                break
            except grpc.aio.AioRpcError as e:  # from P (D's failures arrive as NoNodeAvailable / RuntimeError)
                for c in calls:
                    c.cancel()
                if attempt == _ATTEMPTS - 1 or e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise RuntimeError(f"prefill failed: {e.code().name}: {e.details()}") from None
                self.stats["retries"] += 1
                log.warning("prefill of %s failed on %s (%s); retrying on another node", node_rid,
                            list(tried)[-1].address, e.code().name)
        if not first.head:  # P ended before sampling, or at once
            prefill_end = None
            if self._prefill_failed(states, out, first):
                return
        else:
            calls.append(prefill_end)  # cancelled with D's stream if the request ends first (P aborts)
        cached = first.num_cached_tokens
        if len(states) == 1:
            if self._put(states, out, state.relay(convert.output_from_proto(first, cached))):
                return
        else:  # each choice's first token; D ends the choices (their first tokens reached it too)
            head = convert.output_from_proto(first, cached)
            for i, s in enumerate(states):
                lp = head.logprobs[i: i + 1] if head.logprobs else []
                delta = RequestOutput(rid, head.token_ids[i: i + 1], lp, num_cached_tokens=cached,
                                      prompt_logprobs=head.prompt_logprobs, index=i)
                self._put(states, out, s.relay(delta))
                if s.finished:  # a stop string in its first token
                    self._abort_choice(decode, node_rid, i)
            if all(s.finished for s in states):
                return
        await self._stream(states, decode, node_rid, call, out, cached, unwrap=True, prefill_end=prefill_end)
        if prefill_end is not None and not prefill_end.done():  # D ended it before P's end came: P's push
            calls.remove(prefill_end)  # ends by itself (bounded), so it is not aborted there
            self._in_background(self._prefill_end_late(prefill_end))

    async def _prefill_end_late(self, task: asyncio.Task) -> None:
        try:
            self.stats["kv_bytes"] += (await task).kv_bytes
        except (grpc.aio.AioRpcError, RuntimeError) as e:
            log.info("prefill end after the request ended: %s", e)

    def _abort_choice(self, node: NodeHandle, node_rid: str, index: int) -> None:
        """Tell a node to end one choice of an n > 1 request (its stop string was found here)."""
        async def send():
            try:
                await node.stub.Abort(pb.AbortRequest(request_id=node_rid, index=index), timeout=self.timeouts.reserve_s)
            except grpc.aio.AioRpcError:
                pass  # the node's own end of the request frees it anyway
        self._in_background(send())

    async def _late_destination(self, prefill: NodeHandle, call, read: asyncio.Future,
                                dest: pb.KVDestination | None) -> None:
        """A request cancelled after D reserved pages but before P surely had their address. Nothing
        can write them then, yet D cannot know it and would hold them for the whole KV timeout. So the
        address still goes to P (read from D's stream first if it had not come yet), whose engine,
        its request ended, sends D the "abandoned" notice that frees them at once; then D's stream
        is cancelled (its abort). Bounded by the reservation timeout."""
        try:
            if dest is None:
                first = await asyncio.wait_for(read, self.timeouts.reserve_s)
                if first is grpc.aio.EOF or not first.HasField("destination") or first.destination.error:
                    return
                dest = first.destination
            cancelled = pb.KVDestination()
            cancelled.CopyFrom(dest)
            cancelled.cancelled = True
            await self._hand_destination(prefill, cancelled)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError, RuntimeError) as e:
            log.info("destination of cancelled %s not handed to %s: %s", dest and dest.request_id, prefill.address, e)
        finally:
            call.cancel()

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stream(self, states: list[RequestState], node: NodeHandle, node_rid: str, call, out, cached: int,
                      unwrap: bool, prefill_end: asyncio.Task | None = None):
        """Relay a node's token stream (D's `Decode` deltas, or a collocated `Generate`) to the client;
        until `prefill_end` (P's call after its head) is done, watch it too: P's end after the push may
        fail the request or end it (the first token ended it)."""
        node.in_flight += 1
        read = None
        try:
            while True:
                if prefill_end is not None:
                    if read is None:
                        read = asyncio.ensure_future(call.read())  # read(), as `_open_decode` began with it
                        read.add_done_callback(lambda f: f.cancelled() or f.exception())
                    await asyncio.wait({read, prefill_end}, return_when=asyncio.FIRST_COMPLETED)
                    if prefill_end.done():
                        if self._prefill_ended(states, out, prefill_end):
                            return
                        prefill_end = None
                    if not read.done():
                        continue
                if read is not None:  # one read at a time: the one begun while P's end was awaited
                    msg, read = await read, None
                else:
                    msg = await call.read()
                if msg is grpc.aio.EOF:
                    break
                delta = convert.output_from_proto(msg.delta if unwrap else msg, cached)
                state = states[delta.index] if 0 <= delta.index < len(states) else None
                if state is None or state.finished:
                    continue  # a choice that already ended here (by a stop string)
                if self._put(states, out, state.relay(delta)):
                    return  # ended; a stop string's end cancels the stream (in _run), which stops the node
                if state.finished and not delta.finished:  # one choice of several ended by a stop string
                    self._abort_choice(node, node_rid, delta.index)
            raise RuntimeError(f"node {node.address} ended the stream without a final status")
        except grpc.aio.AioRpcError as e:
            self.registry.mark_dead(node)
            raise RuntimeError(f"decode node {node.address} failed mid-request: {e.code().name}") from None
        finally:
            if read is not None and not read.done():
                read.cancel()
            node.in_flight -= 1
            node.served += 1

    def _prefill_failed(self, states: list[RequestState], out: asyncio.Queue, end: pb.PrefillResponse) -> bool:
        """P's end: a failure there ends the request with its error (True); else its KV bytes count."""
        if end.error or end.finish_reason == "error":
            self._end(states, out, "error", end.error or "prefill failed")
            return True
        self.stats["kv_bytes"] += end.kv_bytes
        return False

    def _prefill_ended(self, states: list[RequestState], out: asyncio.Queue, task: asyncio.Task) -> bool:
        """P's end after its head: the push failed (the request fails: its first token was streamed, so
        it is not retried), the first token ended the request, or the KV is on D; True if it ended."""
        try:
            end = task.result()
        except grpc.aio.AioRpcError as e:
            raise RuntimeError(f"prefill node failed after the first token: {e.code().name}: {e.details()}") from None
        if self._prefill_failed(states, out, end):
            return True
        if not end.finished:
            return False
        for s in states:
            if not s.finished:
                self._put(states, out, s.relay(convert.output_from_proto(end, end.num_cached_tokens)))
        return all(s.finished for s in states)
