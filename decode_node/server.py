"""Decode node: for each request one `Decode` call reserves pages for the prompt's KV, answers
where a prefill node must write it, waits (bounded) for that node's notice naming the transfer
(with the first token; with n > 1 choices every choice's, and the choices fork there, sharing the
prompt's pages), joins the running batch and streams token ids (each delta names its choice). In a collocated cluster
(no prefill nodes) it also runs prompts itself (`Generate`)."""
from __future__ import annotations

import asyncio
import time

import grpc

from node.core import Node
from node.server import serve
from node.servicer import NodeServicerBase, delta_to_proto
from proto import convert
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc


class DecodeServicer(NodeServicerBase, pb_grpc.DecodeNodeServicer):
    def __init__(self, node: Node):
        self.node = node

    async def Decode(self, request: pb.DecodeRequest, context):
        """One call per request: reserve pages for the prompt's KV, answer where to write it, then
        stream the tokens once the prefill node's notice arrives. Cancelling it aborts the request."""
        rid = request.request_id
        try:
            params = convert.params_from_proto(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        node = self.node
        loop = asyncio.get_running_loop()
        node.in_flight.add(rid)
        # Admission blocks a worker thread until the engine answers; the call may be cancelled
        # meanwhile, before the engine has even seen the request. The thread runs on (shielded), and
        # if it admits the request after all, the request is aborted then: an abort sent before the
        # admission would be dropped as unknown and the pages kept until the KV timeout.
        admit = loop.run_in_executor(
            None, lambda: node.client.add_remote_request(list(request.prompt_token_ids), params, rid,
                                                         tuple(request.eos_token_ids) or None))
        try:
            try:
                dest, stream = await asyncio.shield(admit)
            except ValueError as e:  # refused (overloaded, too long, duplicate id): nothing was kept
                yield pb.DecodeResponse(destination=pb.KVDestination(request_id=rid, error=str(e)))
                return
            yield pb.DecodeResponse(destination=convert.dest_to_proto(dest))
            async for msg in _observed(node, rid, stream, request, collocated=False):
                yield pb.DecodeResponse(delta=msg)
        except asyncio.CancelledError:
            node.client.abort(rid)
            if not admit.done():
                admit.add_done_callback(
                    lambda f: not f.cancelled() and f.exception() is None and node.client.abort(rid))
            raise
        finally:
            node.in_flight.discard(rid)

    async def Generate(self, request: pb.DecodeRequest, context):
        """Collocated serving: prefill and decode here, no KV transfer."""
        rid = request.request_id
        try:
            params = convert.params_from_proto(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        node = self.node
        node.in_flight.add(rid)
        try:
            stream = node.client.add_request(list(request.prompt_token_ids), params, request_id=rid,
                                             eos_token_ids=tuple(request.eos_token_ids) or None)
            async for msg in _observed(node, rid, stream, request, collocated=True):
                yield msg
        except asyncio.CancelledError:
            node.client.abort(rid)
            raise
        except ValueError as e:  # refused by the engine front (e.g. duplicate id)
            yield pb.GenerateResponse(request_id=rid, finished=True, finish_reason="error", error=str(e))
        finally:
            node.in_flight.discard(rid)


async def _observed(node: Node, rid: str, stream, request: pb.DecodeRequest, collocated: bool):
    """The stream's deltas as protos, with the node's latency metrics: inter-token gaps as they
    come; TTFT and queue time too when the node ran the prompt itself (collocated); else the first
    token came from the prefill node and the first gap here is already an inter-token one. With
    n > 1 choices the latencies are choice 0's (the choices step together), the token counts every
    choice's, and the request is observed once, when its last choice ends."""
    m = node.metrics
    start = last = time.monotonic()
    num_choices = request.sampling.n if request.sampling.HasField("n") else 1
    num_tokens = 0 if collocated else 1  # of choice 0
    all_tokens = 0 if collocated else num_choices
    async for delta in stream:
        now = time.monotonic()
        all_tokens += len(delta.token_ids)
        if delta.token_ids and delta.index == 0:
            if num_tokens == 0:
                m.observe("time_to_first_token_seconds", now - start)
                if delta.queue_seconds is not None:
                    m.observe("request_queue_time_seconds", delta.queue_seconds)
            else:
                m.observe("inter_token_latency_seconds", now - last)
            num_tokens += len(delta.token_ids)
            last = now
        num_choices -= delta.finished
        if delta.finished and not num_choices:  # the request's end: its last choice ended
            if collocated:
                m.inc("prompt_tokens_total", len(request.prompt_token_ids))
            _observe_decode(node, delta, now - start, num_tokens, all_tokens)
        yield delta_to_proto(rid, delta)


def _observe_decode(node: Node, final, seconds: float, num_tokens: int, all_tokens: int) -> None:
    m = node.metrics
    if final.finish_reason == "error":
        m.inc("request_failure_total", reason="kv_transfer" if "KV" in (final.error or "") else "decode")
        return
    m.inc("request_success_total", finished_reason=final.finish_reason or "unknown")
    m.inc("generation_tokens_total", all_tokens)
    m.observe("request_generation_tokens", all_tokens)
    m.observe("request_decode_time_seconds", seconds)
    if num_tokens > 1:
        m.observe("request_time_per_output_token_seconds", seconds / (num_tokens - 1))


def main(engine_config, model_name: str, host: str, port: int, options=None) -> None:
    node = Node("decode", engine_config, model_name, options)
    asyncio.run(serve(node, DecodeServicer(node), pb_grpc.add_DecodeNodeServicer_to_server,
                      "pdserve.v1.DecodeNode", host, port))
    if node.engine_died:
        raise SystemExit(1)
