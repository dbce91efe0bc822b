"""The client's first token does not wait for the KV push: the router relays P's head (its first
token, streamed the moment it is sampled) while P's push is still running, then ends the request
by whichever comes first of D's stream and P's end. Real router code and real gRPC over loopback;
both nodes are scripted gRPC servers (no engine) so the order of events is fixed."""
from __future__ import annotations

import asyncio

import grpc

from engine.sampling_params import SamplingParams
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from tests.router.scripted_nodes import scripted_cluster


class ScriptedDecode(pb_grpc.DecodeNodeServicer):
    def __init__(self):
        self.kv_landed, self.cancelled = asyncio.Event(), asyncio.Event()

    async def Info(self, request, context):
        return pb.NodeInfo(role="decode", max_model_len=64, max_num_seqs=8)

    async def Decode(self, request, context):
        try:
            yield pb.DecodeResponse(destination=pb.KVDestination(request_id=request.request_id, transfer_id="t1",
                                                                 page_ids=[3]))
            await self.kv_landed.wait()
            yield pb.DecodeResponse(delta=pb.GenerateResponse(request_id=request.request_id, token_ids=[8]))
            yield pb.DecodeResponse(delta=pb.GenerateResponse(request_id=request.request_id, token_ids=[9],
                                                              finished=True, finish_reason="length"))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


class ScriptedPrefill(pb_grpc.PrefillNodeServicer):
    def __init__(self, end: pb.PrefillResponse | None):
        self.end = end  # None: P dies after its head (the call fails UNAVAILABLE)
        self.push_done, self.calls = asyncio.Event(), 0

    async def Info(self, request, context):
        return pb.NodeInfo(role="prefill", max_model_len=64)

    async def Prefill(self, request, context):
        self.calls += 1
        yield pb.PrefillResponse(request_id=request.request_id, head=True, token_ids=[7])
        await self.push_done.wait()
        if self.end is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node went away")
        yield self.end

    async def SetDestination(self, request, context):
        return pb.SetDestinationResponse(found=True)


def _scenario(end: pb.PrefillResponse | None, land_kv: bool) -> tuple[list, ScriptedPrefill, ScriptedDecode]:
    """Generate 3 tokens; returns the client's deltas (the first read while P's push still runs)."""
    async def main():
        decode, prefill = ScriptedDecode(), ScriptedPrefill(end)
        async with scripted_cluster(prefill, decode) as router:
            stream = router.generate("r1", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
            first = await asyncio.wait_for(stream.__anext__(), 10)
            assert first.token_ids == [7] and not first.finished  # P's push has not ended
            assert not prefill.push_done.is_set()
            prefill.push_done.set()
            if land_kv:
                decode.kv_landed.set()
            deltas = [first] + [d async for d in stream]
            if not land_kv:  # the request ended without D: its stream is cancelled (D frees the pages)
                await asyncio.wait_for(decode.cancelled.wait(), 10)
            return deltas, prefill, decode
    return asyncio.run(asyncio.wait_for(main(), 60))


def test_the_first_token_reaches_the_client_before_the_push_ends_then_d_streams_the_rest():
    deltas, prefill, _ = _scenario(pb.PrefillResponse(request_id="r1", kv_bytes=64), land_kv=True)
    assert [t for d in deltas for t in d.token_ids] == [7, 8, 9]
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert sum(d.finished for d in deltas) == 1 and prefill.calls == 1


def test_a_push_that_fails_after_the_first_token_fails_the_request_without_a_retry():
    deltas, prefill, decode = _scenario(pb.PrefillResponse(request_id="r1", finished=True, finish_reason="error",
                                                           error="KV transfer timed out"), land_kv=False)
    assert [t for d in deltas for t in d.token_ids] == [7]
    assert deltas[-1].finish_reason == "error" and "timed out" in deltas[-1].error
    assert sum(d.finished for d in deltas) == 1 and prefill.calls == 1  # a token was streamed: no retry


def test_a_prefill_node_that_dies_after_the_first_token_fails_the_request_and_d_is_cancelled():
    deltas, prefill, decode = _scenario(None, land_kv=False)
    assert deltas[-1].finish_reason == "error" and "UNAVAILABLE" in deltas[-1].error
    assert prefill.calls == 1 and decode.cancelled.is_set()  # (waited for in _scenario)


def test_a_first_token_that_ends_the_request_ends_it_with_p_s_end():
    deltas, _, decode = _scenario(pb.PrefillResponse(request_id="r1", finished=True, finish_reason="stop",
                                                     stop_reason="7"), land_kv=False)
    assert [t for d in deltas for t in d.token_ids] == [7]
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    assert decode.cancelled.is_set()  # D's reservation is released by cancelling its stream
