"""Prefill node: runs prompts (chunked prefill, prefix cache), samples the first token, writes the
prompt's KV into the decode node's reserved pages over NIXL. It streams the first token to the router
the moment it is sampled (the client's TTFT does not wait for the transfer), and ends its answer once
the WRITEs are done.
It never decodes beyond the first token: with n > 1 choices it samples each choice's first token from
the prompt's last logits (the engine forks the choices) and sends the KV once.

The destination may follow the prompt (`destination_follows`, then `SetDestination`): the prefill
starts at once and the decode node's reservation overlaps it. The two calls may arrive in either
order; a destination that comes first waits here (bounded) for its Prefill call."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict

import grpc

from node.core import Node
from node.server import serve
from node.servicer import NodeServicerBase
from proto import convert
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc


_EARLY_DEST_S = 60.0  # how long a destination that came before its Prefill call is kept for it


def _remember(entries: OrderedDict, rid: str, value) -> None:
    """Keep `value` for `rid` for `_EARLY_DEST_S` seconds (and drop what is older)."""
    now = time.monotonic()
    while entries and now - next(iter(entries.values()))[0] > _EARLY_DEST_S:
        entries.popitem(last=False)
    entries[rid] = (now, value)


class PrefillServicer(NodeServicerBase, pb_grpc.PrefillNodeServicer):
    def __init__(self, node: Node):
        self.node = node
        self._awaiting_dest: set[str] = set()  # Prefill calls started with destination_follows
        # in arrival order, so the expired ones are at the front
        self._early_dests: OrderedDict[str, tuple[float, dict]] = OrderedDict()  # came before their Prefill call
        self._ended: OrderedDict[str, tuple[float, None]] = OrderedDict()  # Prefill calls that ended, for late destinations

    async def SetDestination(self, request: pb.KVDestination, context) -> pb.SetDestinationResponse:
        rid, dest = request.request_id, convert.dest_from_proto(request)
        if request.cancelled:  # the router's client left: nothing may be written to these pages, so the
            # request ends here (if it runs: its cancelled call may not have ended yet) and is handed
            # the destination as an ended one below, which the engine abandons (D frees the pages)
            self._early_dests.pop(rid, None)
            _remember(self._ended, rid, None)  # a Prefill call for it that comes later is refused
            self.node.client.abort(rid)
        if rid in self._awaiting_dest or rid in self._ended:  # the engine abandons it if the request ended
            found = rid in self._awaiting_dest
            self._awaiting_dest.discard(rid)
            self.node.client.set_kv_dest(rid, dest)
            return pb.SetDestinationResponse(found=found)
        _remember(self._early_dests, rid, dest)
        return pb.SetDestinationResponse(found=False)

    def _start(self, rid: str, request: pb.PrefillRequest, first) -> object:
        """Add the request to the engine; with `destination_follows`, hand over a destination that
        already came, or expect it."""
        node = self.node
        follows = request.destination_follows
        dest = {} if follows else convert.dest_from_proto(request.destination)  # {}: engine's DESTINATION_FOLLOWS
        stream = node.client.add_request(list(request.prompt_token_ids), first, request_id=rid, kv_dest=dest,
                                         eos_token_ids=tuple(request.eos_token_ids) or None)
        if follows:
            early = self._early_dests.pop(rid, None)
            if early is not None:
                node.client.set_kv_dest(rid, early[1])
            else:
                self._awaiting_dest.add(rid)
        return stream

    async def Prefill(self, request: pb.PrefillRequest, context):
        """The head (first tokens, as soon as every choice has one) and then the end (after the push);
        see `PrefillResponse` in the .proto."""
        rid = request.request_id
        try:
            params = convert.params_from_proto(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        first = dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))
        node = self.node
        if rid in self._ended:  # cancelled before its call came (SetDestination said so), or a repeated id
            yield pb.PrefillResponse(request_id=rid, finished=True, finish_reason="abort",
                                     error=f"request {rid!r} was cancelled or has already ended here")
            return
        t0 = time.monotonic()
        node.in_flight.add(rid)
        head_sent = False
        try:
            stream = self._start(rid, request, first)
            choices = [([], []) for _ in range(params.n)]  # per choice: its first token (and logprob)
            last, first_delta_queue, prompt_logprobs, error, cached = None, None, None, None, 0
            async for delta in stream:
                choices[delta.index][0].extend(delta.token_ids)
                choices[delta.index][1].extend(delta.logprobs)
                prompt_logprobs = delta.prompt_logprobs or prompt_logprobs
                cached = max(cached, delta.num_cached_tokens)
                if delta.queue_seconds is not None:
                    first_delta_queue = delta.queue_seconds
                if delta.finish_reason == "error":
                    error = error or delta
                if delta.index == 0 and delta.finished:  # choice 0 ends last: after its KV push
                    last = delta
                if not head_sent and error is None and last is None and all(ids for ids, _ in choices):
                    head_sent = True  # the client's first token must not wait for the transfer
                    yield _with_first_tokens(pb.PrefillResponse(request_id=rid, head=True, num_cached_tokens=cached),
                                             choices, prompt_logprobs)
        except asyncio.CancelledError:
            node.client.abort(rid)
            raise
        except ValueError as e:
            yield pb.PrefillResponse(request_id=rid, finished=True, finish_reason="error", error=str(e))
            return
        finally:
            node.in_flight.discard(rid)
            self._awaiting_dest.discard(rid)
            _remember(self._ended, rid, None)  # a destination after this is forwarded: the engine abandons it
        if error is not None or last is None:
            last = error or last
        elif params.n > 1 and any(len(ids) != 1 for ids, _ in choices):
            last = dataclasses.replace(last, finish_reason="error", error=f"request {rid!r}: a choice has no first token")
        kv = last.kv_transfer or {}
        _observe_prefill(node, request, first_delta_queue, time.monotonic() - t0, last, kv)
        # Finished "for real" only if the first token stopped it or the client asked for one token;
        # with n > 1 choices the decode node ends each choice (its notice carries every first token).
        done = last.finish_reason in ("stop", "abort", "error") or params.max_tokens == 1
        if params.n > 1:
            done = last.finish_reason in ("abort", "error")
        end = pb.PrefillResponse(
            request_id=rid, finished=done, finish_reason=last.finish_reason or "",
            stop_reason="" if last.stop_reason is None else str(last.stop_reason), error=last.error or "",
            num_cached_tokens=last.num_cached_tokens or cached, kv_bytes=int(kv.get("bytes", 0)),
            kv_seconds=float(kv.get("seconds", 0.0)), prefill_seconds=time.monotonic() - t0)
        yield end if head_sent else _with_first_tokens(end, choices, prompt_logprobs)


def _with_first_tokens(msg: pb.PrefillResponse, choices: list, prompt_logprobs) -> pb.PrefillResponse:
    """`msg` carrying every choice's first token (and logprob), in choice order, and the prompt's logprobs."""
    msg.token_ids.extend(t for ids, _ in choices for t in ids)
    msg.logprobs.extend(convert.logprobs_to_proto([e for _, lps in choices for e in lps]))
    msg.prompt_logprobs.extend(convert.prompt_logprobs_to_proto(prompt_logprobs))
    return msg


def _observe_prefill(node: Node, request, queue_s, total_s: float, last, kv: dict) -> None:
    m = node.metrics
    if last.finish_reason == "error":
        reason = "kv_transfer" if "KV" in (last.error or "") else "prefill"
        m.inc("request_failure_total", reason=reason)
        if reason == "kv_transfer":
            m.inc("kv_transfer_failures_total", reason="timeout" if "time" in (last.error or "") else "error")
        return
    m.inc("prompt_tokens_total", len(request.prompt_token_ids))
    m.observe("request_prompt_tokens", len(request.prompt_token_ids))
    if queue_s is not None:
        m.observe("request_queue_time_seconds", queue_s)
        m.observe("request_prefill_time_seconds", max(0.0, total_s - queue_s))
    if kv:
        m.observe("kv_transfer_time_seconds", float(kv.get("seconds", 0.0)))
        for key, metric in (("exposed_seconds", "kv_transfer_exposed_seconds"),
                            ("destination_wait_seconds", "kv_destination_wait_seconds"),
                            ("write_tail_seconds", "kv_write_tail_seconds"),
                            ("post_delay_seconds", "kv_post_delay_seconds"),
                            ("write_lock_wait_seconds", "kv_write_lock_wait_seconds"),
                            ("write_call_seconds", "kv_write_call_seconds"), ("writes", "kv_writes_per_push")):
            if key in kv:
                m.observe(metric, float(kv[key]))
        m.inc("kv_transfer_bytes_total", int(kv.get("bytes", 0)))


def main(engine_config, model_name: str, host: str, port: int, options=None) -> None:
    node = Node("prefill", engine_config, model_name, options)
    asyncio.run(serve(node, PrefillServicer(node), pb_grpc.add_PrefillNodeServicer_to_server,
                      "pdserve.v1.PrefillNode", host, port))
    if node.engine_died:
        raise SystemExit(1)
