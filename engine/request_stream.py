"""One request's output deltas on the front side: a thread-safe queue the engine client's receiver
thread fills, read synchronously or from asyncio, and `collect`, which folds a finished stream
into one result per choice. It knows nothing of engine processes or sockets."""
from __future__ import annotations

import asyncio
import queue
import threading

from engine.outputs import RequestOutput


class RequestStream:
    """Deltas of one request, ending with one whose `finished` is true. Read it synchronously
    (`for delta in stream`, `get`) or from asyncio (`async for delta in stream`), not both.

    An asyncio reader gets deltas handed to its event loop by the receiver thread; it holds no
    executor thread while it waits. (Waiting in `run_in_executor` did: a node with more open
    streams than executor workers — prefills waiting for their KV push, decodes for their KV —
    starved everything else it runs there, such as its `Info` answers and Redis heartbeats.)"""

    def __init__(self, request_id: str, num_choices: int = 1):
        self.request_id = request_id
        self.num_choices = num_choices  # n > 1: deltas of every choice (`index`), each ending finished
        self._q: queue.Queue[RequestOutput] = queue.Queue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aq: asyncio.Queue | None = None

    def put(self, delta: RequestOutput) -> None:
        with self._lock:
            if self._loop is None:
                self._q.put(delta)
                return
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, delta)
            except RuntimeError:  # the reader's event loop is closed: nobody is listening any more
                pass

    def get(self, timeout: float | None = None) -> RequestOutput:
        return self._q.get(timeout=timeout)

    def __iter__(self):
        open_choices = self.num_choices
        while True:
            delta = self._q.get()
            yield delta
            open_choices -= delta.finished
            if not open_choices:
                return

    async def __aiter__(self):
        aq: asyncio.Queue = asyncio.Queue()
        with self._lock:  # deltas that came before the reader attached go first, in order
            while not self._q.empty():
                aq.put_nowait(self._q.get_nowait())
            self._loop, self._aq = asyncio.get_running_loop(), aq
        open_choices = self.num_choices
        while True:
            delta = await aq.get()
            yield delta
            open_choices -= delta.finished
            if not open_choices:
                return


def collect(stream: RequestStream) -> list[RequestOutput]:
    """Read `stream` to its end: each choice's accumulated result, in choice order (one for n = 1)."""
    parts = [([], [], []) for _ in range(stream.num_choices)]
    last = {}
    for delta in stream:
        token_ids, text, logprobs = parts[delta.index]
        token_ids += delta.token_ids
        text.append(delta.text)
        logprobs += delta.logprobs
        if delta.finished:
            last[delta.index] = delta
    for i, (token_ids, text, logprobs) in enumerate(parts):
        last[i].token_ids, last[i].text, last[i].logprobs = token_ids, "".join(text), logprobs
    return [last[i] for i in range(stream.num_choices)]
