"""A request cancelled while the decode node is still reserving: the router must not leave D's
pages to the KV timeout. Real router code and real gRPC over loopback; the two nodes are scripted
gRPC servers (no engine), so the order of events is fixed: D answers with its address only after
the client has left. The router must still read that answer, hand it to P marked `cancelled` (P
then tells D to free the pages), and only then cancel D's stream."""
from __future__ import annotations

import asyncio


from engine.sampling_params import SamplingParams
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from tests.router.scripted_nodes import scripted_cluster


class ScriptedDecode(pb_grpc.DecodeNodeServicer):
    def __init__(self):
        self.entered, self.release, self.cancelled = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def Info(self, request, context):
        return pb.NodeInfo(role="decode", max_model_len=64, max_num_seqs=8)

    async def Decode(self, request, context):
        self.entered.set()
        try:
            await self.release.wait()  # the client leaves before this answer
            yield pb.DecodeResponse(destination=pb.KVDestination(request_id=request.request_id,
                                                                 transfer_id="t1", page_ids=[3, 4]))
            await asyncio.sleep(60)  # reserved, waiting for the KV: until the router cancels
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


class ScriptedPrefill(pb_grpc.PrefillNodeServicer):
    def __init__(self):
        self.destinations: list[pb.KVDestination] = []
        self.got_destination = asyncio.Event()

    async def Info(self, request, context):
        return pb.NodeInfo(role="prefill", max_model_len=64)

    async def Prefill(self, request, context):
        await asyncio.sleep(60)  # still computing when the client leaves
        yield pb.PrefillResponse(request_id=request.request_id)  # (never reached: a stream's shape)

    async def SetDestination(self, request, context):
        self.destinations.append(request)
        self.got_destination.set()
        return pb.SetDestinationResponse(found=False)


def test_a_request_cancelled_before_d_answered_still_hands_d_address_to_p_marked_cancelled():
    async def main():
        decode, prefill = ScriptedDecode(), ScriptedPrefill()
        async with scripted_cluster(prefill, decode) as router:
            stream = router.generate("r1", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
            consumer = asyncio.ensure_future(stream.__anext__())
            await asyncio.wait_for(decode.entered.wait(), 10)
            assert router.abort("r1")
            final = await asyncio.wait_for(consumer, 10)
            assert final.finished and final.finish_reason == "abort"
            assert not prefill.destinations and not decode.cancelled.is_set()  # D has not answered yet
            decode.release.set()
            await asyncio.wait_for(prefill.got_destination.wait(), 10)
            dest = prefill.destinations[0]
            assert dest.cancelled and dest.request_id == "r1" and list(dest.page_ids) == [3, 4]
            await asyncio.wait_for(decode.cancelled.wait(), 10)  # then D's stream ends (its abort)
            assert len(prefill.destinations) == 1
    asyncio.run(main())
