"""The engine loop in its own process behind ZMQ: same tokens as in-process, streaming deltas,
abort, refused requests, and no hang when the engine process dies."""
from __future__ import annotations

import os
import signal

import pytest

from engine import LLM, SamplingParams
from engine.engine_client import EngineClient
from engine.llm import build_engine_config

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 8], [11, 12, 13]]
KW = dict(load_format="dummy", page_size=4, num_pages=128, max_model_len=64)


@pytest.fixture(scope="module")
def client():
    c = EngineClient(build_engine_config("tiny-llama", **KW))
    yield c
    c.shutdown()


def _greedy(n=8):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def test_engine_process_gives_the_in_process_tokens(client):
    expected = [o.token_ids for o in LLM("tiny-llama", **KW).generate(prompt_token_ids=PROMPTS, sampling_params=_greedy())]
    got = [o.token_ids for o in client.generate(PROMPTS, _greedy())]
    assert got == expected
    assert client._procs[0].pid != os.getpid()


def test_stream_delivers_one_token_per_delta_and_one_terminal(client):
    deltas = list(client.add_request(PROMPTS[0], _greedy(5)))
    assert [len(d.token_ids) for d in deltas] == [1] * 5
    assert [d.finished for d in deltas] == [False] * 4 + [True]
    assert deltas[-1].finish_reason == "length"


def test_abort_ends_the_stream_with_abort(client):
    stream = client.add_request(PROMPTS[1], _greedy(60))
    first = stream.get(timeout=60)
    assert not first.finished
    client.abort(stream.request_id)
    rest = list(stream)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"


def test_refused_request_gets_an_error_and_the_engine_keeps_serving(client):
    bad = list(client.add_request(list(range(100)), _greedy()))  # over max_model_len=64
    assert bad[-1].finish_reason == "error" and "context limit" in bad[-1].error
    ok = client.generate([PROMPTS[1]], _greedy(3))[0]
    assert ok.finish_reason == "length" and len(ok.token_ids) == 3


def test_engine_death_fails_in_flight_requests_instead_of_hanging():
    c = EngineClient(build_engine_config("tiny-llama", **KW))
    try:
        stream = c.add_request(PROMPTS[0], _greedy(10_000 // 200))
        stream.get(timeout=60)
        os.kill(c._procs[0].pid, signal.SIGKILL)
        last = list(stream)[-1]
        assert last.finished and last.finish_reason == "error" and "died" in last.error
    finally:
        c.shutdown()
    assert not os.path.exists(c._dir)  # its IPC sockets' folder goes with it


def test_async_readers_hold_no_executor_thread_while_they_wait():
    """More waiting asyncio readers than the loop's executor has workers must not starve other
    executor work (a node's Info answers and heartbeats run there)."""
    import asyncio
    import threading

    from engine.engine_client import RequestStream
    from engine.outputs import RequestOutput

    streams = [RequestStream(f"r{i}") for i in range(64)]
    streams[0].put(RequestOutput("r0", [1], text="a"))  # a delta before the reader attaches

    async def read(stream):
        return [d.token_ids async for d in stream]

    async def scenario():
        loop = asyncio.get_running_loop()
        readers = [asyncio.create_task(read(s)) for s in streams]
        await asyncio.sleep(0.1)  # every reader is waiting now
        assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 42), timeout=2.0) == 42
        threading.Thread(target=lambda: [s.put(RequestOutput(s.request_id, [7], text="b", finished=True))
                                         for s in streams]).start()
        return await asyncio.wait_for(asyncio.gather(*readers), timeout=5.0)

    results = asyncio.run(scenario())
    assert results[0] == [[1], [7]] and all(r == [[7]] for r in results[1:])
