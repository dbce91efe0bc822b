"""A prefill node started with `destination_follows` gets the destination by `SetDestination`,
which may come before the Prefill call, during it, or after it ended (a fake engine client records
what reaches the engine): it reaches the engine exactly once in every order, and after the end it
still does (the engine then tells the decode node to free its pages)."""
from __future__ import annotations

import asyncio

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from prefill_node.server import PrefillServicer
from proto import convert
from proto import pdserve_pb2 as pb

LAYOUT = {"kind": "gqa", "num_layers": 2, "page_size": 4, "num_components": 2, "num_heads": 2, "head_dim": 8,
          "dtype": "float32"}


class FakeStream:
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self):
        out = await self.queue.get()
        if out is None:
            raise StopAsyncIteration
        return out


class FakeClient:
    def __init__(self):
        self.calls: list = []
        self.streams: dict[str, FakeStream] = {}

    def add_request(self, ids, params, request_id, kv_dest, eos_token_ids=None):
        self.calls.append(("add", request_id, kv_dest))
        self.streams[request_id] = FakeStream()
        return self.streams[request_id]

    def set_kv_dest(self, request_id, dest):
        self.calls.append(("dest", request_id, dest["transfer_id"]))

    def abort(self, request_id):
        self.calls.append(("abort", request_id))


class FakeMetrics:
    def inc(self, *a, **k):
        pass

    def observe(self, *a, **k):
        pass


class FakeNode:
    def __init__(self):
        self.client, self.metrics, self.in_flight = FakeClient(), FakeMetrics(), set()


def _dest(rid: str) -> pb.KVDestination:
    return convert.dest_to_proto({"request_id": rid, "agent_name": "d", "agent_metadata": b"m", "layer_addrs": [1, 2],
                                  "page_ids": [0, 1], "layout": LAYOUT, "transfer_id": f"{rid}#t"})


def _prefill(rid: str) -> pb.PrefillRequest:
    return pb.PrefillRequest(request_id=rid, prompt_token_ids=[5, 6, 7],
                             sampling=convert.params_to_proto(SamplingParams(max_tokens=3)), destination_follows=True)


async def _finish(node: FakeNode, rid: str) -> None:
    """The engine's two outputs of a prefill-role request: its first token, then its end after the push."""
    stream = node.client.streams[rid]
    await stream.queue.put(RequestOutput(rid, [9]))
    await stream.queue.put(RequestOutput(rid, [], finished=True, finish_reason="length",
                                         kv_transfer={"bytes": 64, "seconds": 0.01}))
    await stream.queue.put(None)


async def _answer(servicer: PrefillServicer, request: pb.PrefillRequest) -> list:
    return [msg async for msg in servicer.Prefill(request, None)]


def _run(order: str) -> list:
    async def main():
        node = FakeNode()
        servicer = PrefillServicer(node)
        if order == "dest first":
            assert not (await servicer.SetDestination(_dest("r"), None)).found
        call = asyncio.ensure_future(_answer(servicer, _prefill("r")))
        await asyncio.sleep(0)  # the Prefill call has added the request
        if order == "prefill first":
            assert (await servicer.SetDestination(_dest("r"), None)).found
        await _finish(node, "r")
        head, end = await call
        assert head.head and head.token_ids == [9] and not head.error
        assert not end.head and not end.token_ids and not end.error and end.kv_bytes == 64 and not end.finished
        if order == "after the end":
            assert not (await servicer.SetDestination(_dest("r"), None)).found
        return node.client.calls
    return asyncio.run(main())


def test_the_destination_reaches_the_engine_once_whichever_call_comes_first():
    for order in ("dest first", "prefill first"):
        assert _run(order) == [("add", "r", {}), ("dest", "r", "r#t")], order


def test_a_destination_after_the_prefill_ended_still_reaches_the_engine_which_abandons_it():
    assert _run("after the end") == [("add", "r", {}), ("dest", "r", "r#t")]


def _cancelled(rid: str) -> pb.KVDestination:
    dest = _dest(rid)
    dest.cancelled = True
    return dest


def test_a_cancelled_destination_ends_the_request_and_reaches_the_engine_to_be_abandoned():
    """The router's client left after D reserved: whether the Prefill call is running here, never
    came, or comes later, the engine gets an abort and then the destination (which it abandons, so
    D frees the pages at once), and a Prefill call that comes later is refused without running."""
    async def main():
        node = FakeNode()
        servicer = PrefillServicer(node)
        call = asyncio.ensure_future(_answer(servicer, _prefill("running")))
        await asyncio.sleep(0)
        assert (await servicer.SetDestination(_cancelled("running"), None)).found
        await _finish(node, "running")
        await call
        assert not (await servicer.SetDestination(_cancelled("never"), None)).found
        late, = await _answer(servicer, _prefill("never"))
        assert late.finished and late.finish_reason == "abort" and "cancelled" in late.error
        return node.client.calls
    assert asyncio.run(main()) == [("add", "running", {}), ("abort", "running"), ("dest", "running", "running#t"),
                                   ("abort", "never"), ("dest", "never", "never#t")]


def test_the_first_token_is_streamed_before_the_push_ends():
    """The head leaves as soon as the engine sampled the first token, while the push still runs;
    the end (after the push) carries no token again, and whether the first token ended the request."""
    async def main():
        node = FakeNode()
        servicer = PrefillServicer(node)
        request = _prefill("r")
        request.sampling.max_tokens = 1
        gen = servicer.Prefill(request, None)
        head = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        await node.client.streams["r"].queue.put(RequestOutput("r", [9], num_cached_tokens=4))
        head = await asyncio.wait_for(head, 5)  # the push has not ended: no end delta was queued
        assert head.head and list(head.token_ids) == [9] and head.num_cached_tokens == 4 and not head.finished
        end = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        assert not end.done()  # the end waits for the push
        await node.client.streams["r"].queue.put(RequestOutput("r", [], finished=True, finish_reason="length",
                                                               num_cached_tokens=4))
        await node.client.streams["r"].queue.put(None)
        end = await asyncio.wait_for(end, 5)
        assert not end.head and not end.token_ids and end.finished and end.finish_reason == "length"
    asyncio.run(main())


def test_a_request_that_fails_before_its_first_token_sends_only_the_end():
    async def main():
        node = FakeNode()
        servicer = PrefillServicer(node)
        call = asyncio.ensure_future(_answer(servicer, _prefill("r")))
        await asyncio.sleep(0)
        await node.client.streams["r"].queue.put(RequestOutput("r", [], finished=True, finish_reason="error",
                                                               error="KV transfer timed out"))
        await node.client.streams["r"].queue.put(None)
        end, = await asyncio.wait_for(call, 5)
        assert not end.head and end.finish_reason == "error" and "KV" in end.error
    asyncio.run(main())
