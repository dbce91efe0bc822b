"""The front's handle on an engine process: start it, send requests and aborts, receive token
deltas, detokenize them here (never in the engine process) and hand text deltas to callers.

A receiver thread owns the output socket; each request's deltas go to its own queue, read either
synchronously (`RequestStream.__iter__`) or from asyncio (`RequestStream.__aiter__`). If the engine
process dies, every in-flight request ends with an error instead of waiting forever.
Starting the processes is `rank_launcher.py`'s; a request's stream is `request_stream.py`'s.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import pickle
import queue
import shutil
import tempfile
import threading

import zmq

from engine.config import EngineConfig, ModelConfig, eos_token_ids
from engine.engine_process import (AbortRequest, AddRemoteRequest, AddRequest, RemoteAdded, SetKVDestination,
                                   Shutdown, Stats, StatsRequest)
from engine.output_processor import RequestState
from engine.outputs import RequestOutput
from engine.rank_launcher import rank_configs, rank_device, start_ranks, wait_ready
from engine.request import RequestStatus
from engine.request_stream import RequestStream, collect
from engine.sampling_params import SamplingParams
from engine.tokenizer import load_tokenizer

__all__ = ["EngineClient", "EngineDeadError", "RequestStream", "rank_device"]

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class EngineClient:
    """With `config.parallel.ep_size` N > 1 it starts this host's EP ranks (N, or N / ep_nnodes of a
    group spanning several hosts) as engine processes (attention data-parallel) and spreads
    requests over them by the fewest requests in flight; a request's messages (add, abort) always go to the rank that holds it."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 600.0, detokenize: bool = True):
        self.config = config
        self.detokenize = detokenize
        self._dir = tempfile.mkdtemp(prefix="pdserve-engine-")
        self._out_addr = f"ipc://{os.path.join(self._dir, 'out')}"
        self._ctx = zmq.Context()
        self._out = self._ctx.socket(zmq.PULL)
        self._out.bind(self._out_addr)
        self.num_ranks = config.parallel.ep_local_size  # EP ranks on this host
        self.rank_offset = config.parallel.ep_rank_offset
        self._in_addrs = [f"ipc://{os.path.join(self._dir, f'in{r}')}" for r in range(self.num_ranks)]
        self._procs, self._ins = [], []
        try:
            self._procs = start_ranks(rank_configs(config), self._in_addrs, self._out_addr)
            self.rank_info = wait_ready(self._out, self._procs, self.rank_offset, startup_timeout_s)
        except BaseException:
            for p in self._procs:
                if p.is_alive():
                    p.kill()
            self._release()
            raise
        self.info = self.rank_info[0]
        for addr in self._in_addrs:
            sock = self._ctx.socket(zmq.PUSH)
            sock.connect(addr)
            self._ins.append(sock)
        self._send_lock = threading.Lock()
        self.max_model_len = self.info.max_model_len
        self._states: dict[str, list[RequestState]] = {}  # one state per choice
        self._streams: dict[str, RequestStream] = {}
        self._replies: dict[str, queue.Queue] = {}  # request id or "#statsN" -> its one reply
        self._rank_of: dict[str, int] = {}  # request id -> EP rank holding it
        self._in_flight = [0] * self.num_ranks
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._closed = False
        self._receiver = threading.Thread(target=self._receive_loop, daemon=True, name="engine-receiver")
        self._receiver.start()

    # Made on first use: a node front (token ids only) needs neither, and ModelConfig's dtype imports
    # torch (seconds of start-up in a process that otherwise never loads it).
    @functools.cached_property
    def model_config(self) -> ModelConfig:
        return ModelConfig(hf=self.info.hf_config, path=self.info.model_path)

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.config.tokenizer or self.info.model_path)

    def _pick_rank(self, request_id: str) -> int:
        with self._lock:
            rank = self._rank_of.get(request_id)
            if rank is None:
                rank = min(range(self.num_ranks), key=lambda r: (self._in_flight[r], r))
                self._rank_of[request_id] = rank
                self._in_flight[rank] += 1
            return rank

    def _forget(self, request_id: str) -> None:
        with self._lock:
            rank = self._rank_of.pop(request_id, None)
            if rank is not None:
                self._in_flight[rank] -= 1

    def _close(self, request_id: str) -> None:
        """The request is over on this side: forget its rank, its choices' states and its stream."""
        self._forget(request_id)
        with self._lock:
            self._states.pop(request_id, None)
            self._streams.pop(request_id, None)

    # ------------------------------------------------------------- API
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
                    request_id: str | None = None, kv_dest: dict | None = None,
                    eos_token_ids: tuple[int, ...] | None = None) -> RequestStream:
        """Start a request. With `kv_dest` (prefill role) its KV is written there once prefilled and
        the final delta (carrying `kv_transfer`) comes after the WRITE completed."""
        rid, stream = self._open(request_id, prompt, prompt_token_ids, params)
        eos = self._eos_ids() if eos_token_ids is None else tuple(eos_token_ids)
        self._send(AddRequest(rid, list(prompt_token_ids), params.to_dict(), eos, kv_dest), self._pick_rank(rid))
        return stream

    def _open(self, request_id, prompt, prompt_token_ids, params) -> tuple[str, RequestStream]:
        if self._closed:
            raise EngineDeadError("engine client is shut down")
        rid = request_id or f"req-{next(self._ids)}"
        if params.n > self.config.scheduler.max_num_seqs:
            raise ValueError(f"request {rid!r}: n = {params.n} choices exceed the engine's max_num_seqs "
                             f"({self.config.scheduler.max_num_seqs})")
        stream = RequestStream(rid, params.n)
        tokenizer = self.tokenizer if self.detokenize else None
        with self._lock:
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in flight")
            self._states[rid] = [RequestState(rid, prompt, list(prompt_token_ids), params, tokenizer, index=i)
                                 for i in range(params.n)]
            self._streams[rid] = stream
        return rid, stream

    def set_kv_dest(self, request_id: str, dest: dict) -> None:
        """Prefill role: the destination of a request started with `kv_dest={}` (it follows). For a
        request that has ended, the engine tells the destination to free its pages."""
        with self._lock:
            rank = self._rank_of.get(request_id, 0)
        self._send(SetKVDestination(request_id, dest), rank)

    def add_remote_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                           eos_token_ids: tuple[int, ...] | None = None,
                           timeout_s: float = 30.0) -> tuple[dict, RequestStream]:
        """Decode role: admit a request whose prompt KV a prefill node writes. Returns the KV
        destination for that node and the request's stream; it decodes once the KV has arrived
        (the first token comes with it). Raises ValueError if the engine refuses (overloaded...)."""
        rid, stream = self._open(request_id, None, prompt_token_ids, params)
        eos = self._eos_ids() if eos_token_ids is None else tuple(eos_token_ids)
        box: queue.Queue[RemoteAdded] = queue.Queue(maxsize=1)
        with self._lock:
            self._replies[rid] = box
        self._send(AddRemoteRequest(rid, list(prompt_token_ids), params.to_dict(), eos), self._pick_rank(rid))
        try:
            reply = box.get(timeout=timeout_s)
        except queue.Empty:
            reply = RemoteAdded(rid, None, f"no reply from the engine for {rid!r} within {timeout_s:.0f} s")
            self.abort(rid)
        finally:
            with self._lock:
                self._replies.pop(rid, None)
        if reply.dest is None:
            self._close(rid)
            raise ValueError(reply.error or "refused")
        return reply.dest, stream

    def engine_stats(self, timeout_s: float = 10.0) -> dict:
        """The engine's scheduler counters (pages free/cached/held/reserved, queue lengths...);
        with several EP ranks, counts are summed, usage averaged, and `ranks` holds each rank's."""
        tokens = [next(self._ids) for _ in range(self.num_ranks)]
        boxes = {t: queue.Queue(maxsize=1) for t in tokens}
        with self._lock:
            for t, box in boxes.items():
                self._replies[f"#stats{t}"] = box
        try:
            for rank, t in enumerate(tokens):
                self._send(StatsRequest(t), rank)
            per_rank = [boxes[t].get(timeout=timeout_s).stats for t in tokens]
        except queue.Empty:
            raise EngineDeadError(f"no stats reply within {timeout_s:.0f} s") from None
        finally:
            with self._lock:
                for t in tokens:
                    self._replies.pop(f"#stats{t}", None)
        if self.num_ranks == 1:
            return dict(per_rank[0], ranks=per_rank)
        total: dict = {}
        for s in per_rank:
            for k, v in s.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        total["kv_cache_usage"] = sum(s.get("kv_cache_usage", 0.0) for s in per_rank) / self.num_ranks
        total["ranks"] = per_rank
        return total

    def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED,
              error: str | None = None, index: int | None = None) -> None:
        """End a request (every choice, or only choice `index` of an n > 1 request)."""
        if self._closed:
            return
        with self._lock:
            rank = self._rank_of.get(request_id)
        for r in ([rank] if rank is not None else range(self.num_ranks)):  # unknown: every rank (idempotent)
            self._send(AbortRequest(request_id, status.value, error, index), r)

    def generate(self, prompts_or_ids: list, params: SamplingParams) -> list[RequestOutput]:
        """Blocking convenience: run all prompts (text or id lists) and return final results in order
        (n > 1: each prompt's n choices in a row)."""
        streams = []
        for p in prompts_or_ids:
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            streams.append((self.add_request(ids, params, prompt=p if isinstance(p, str) else None)))
        return [out for s in streams for out in collect(s)]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for r in range(self.num_ranks):
            try:
                self._send(Shutdown(), r)
            except zmq.ZMQError:
                pass
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        self._receiver.join(3)
        self._release()

    def _release(self) -> None:
        """Close this side's sockets and ZMQ context and remove the IPC sockets' folder."""
        for sock in self._ins:
            sock.close(0)
        self._out.close(0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _send(self, msg, rank: int = 0) -> None:
        with self._send_lock:
            self._ins[rank].send(pickle.dumps(msg))

    def dead_process(self):
        """The first engine process (EP rank) that has exited, or None while all run."""
        return next((p for p in self._procs if not p.is_alive()), None)

    def _eos_ids(self) -> tuple[int, ...]:
        ids = eos_token_ids(self.info.hf_config)
        if not ids and getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids = [self.tokenizer.eos_token_id]
        return tuple(ids)

    # ------------------------------------------------------------- receiver thread
    def _receive_loop(self) -> None:
        while not self._closed:
            if not self._out.poll(200):
                dead = self.dead_process()
                if dead is not None:  # one EP rank gone stalls the others' collectives: fail everything
                    self._fail_all(f"engine process {dead.name} died (exit code {dead.exitcode})")
                    return
                continue
            try:
                outputs = pickle.loads(self._out.recv())
            except zmq.ZMQError:
                return
            if isinstance(outputs, (RemoteAdded, Stats)):
                key = outputs.request_id if isinstance(outputs, RemoteAdded) else f"#stats{outputs.token}"
                with self._lock:
                    box = self._replies.get(key)
                if box is not None:
                    box.put(outputs)
                continue
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            states = self._states.get(out.request_id)
            stream = self._streams.get(out.request_id)
        state = states[out.index] if states is not None and 0 <= out.index < len(states) else None
        if state is None or state.finished:
            if out.finished and states is None:
                self._forget(out.request_id)
            return
        delta, stopped = state.process(out)
        if stopped:
            self.abort(out.request_id, RequestStatus.FINISHED_STOPPED, index=out.index if len(states) > 1 else None)
        if delta.finished and all(s.finished for s in states):
            self._close(out.request_id)
        stream.put(delta)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            pending = [(rid, s.index) for rid, states in self._states.items() for s in states if not s.finished]
            boxes = list(self._replies.items())
        for rid, box in boxes:
            box.put(RemoteAdded(rid, None, message))
        for rid, index in pending:
            self._deliver(RequestOutput(rid, [], finished=True, finish_reason="error", error=message, index=index))
