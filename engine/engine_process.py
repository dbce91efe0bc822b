"""The engine loop in its own process (one per GPU rank), fed over ZMQ.

CPU/GPU separation from the seed talks: the front process tokenizes, detokenizes and serves the
API; this process only admits requests, steps the engine and ships token deltas back, so Python
work in the front never stalls the GPU. Messages are small typed tuples pickled over ZMQ:

    front → engine:  AddRequest | AddRemoteRequest | SetKVDestination | AbortRequest | StatsRequest | Shutdown
    engine → front:  EngineReady | EngineFailed (startup) | list[RequestOutput] (one per step)
                     | RemoteAdded (a KV destination) | Stats

A prefill- or decode-role engine gets its KV connector here, by the name in `EngineConfig.kv_connector`
(the engine owns the interface; `kvtransfer/` implements it and is never imported by the engine).
"""
from __future__ import annotations

import logging
import os
import pickle
import time
import traceback
from dataclasses import dataclass

import zmq

from engine.config import EngineConfig
from engine.request import RequestStatus

log = logging.getLogger(__name__)


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: dict  # SamplingParams.to_dict()
    eos_token_ids: tuple[int, ...] | None = None
    kv_dest: dict | None = None  # prefill role: where to write this request's KV


@dataclass
class AddRemoteRequest:  # decode role: a request whose prompt KV a prefill engine writes
    request_id: str
    prompt_token_ids: list[int]
    params: dict
    eos_token_ids: tuple[int, ...] | None = None


@dataclass
class SetKVDestination:  # prefill role: the destination of a request added with kv_dest={} (it follows)
    request_id: str
    dest: dict


@dataclass
class RemoteAdded:  # engine → front: where the prefill engine must write the KV, or why nowhere
    request_id: str
    dest: dict | None
    error: str | None = None


@dataclass
class StatsRequest:  # front → engine: a snapshot of the scheduler's counters
    token: int


@dataclass
class Stats:
    token: int
    stats: dict


@dataclass
class AbortRequest:
    request_id: str
    status: str = RequestStatus.FINISHED_ABORTED.value
    error: str | None = None
    index: int | None = None  # one choice of an n > 1 request (None: all of them)


@dataclass
class Shutdown:
    pass


@dataclass
class EngineReady:
    model_path: str | None
    hf_config: dict
    max_model_len: int
    num_pages: int
    page_size: int
    eos_token_ids: list[int]
    kv_role: str | None = None
    incarnation: str | None = None
    kv_layout: dict | None = None
    rank: int = 0  # EP rank


@dataclass
class EngineFailed:
    message: str


def run_engine_process(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """Process entry point: build the engine, announce readiness, then loop until Shutdown."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)
    from engine.kernels import jit_watch

    jit_watch.install()
    try:
        from engine.engine_core import EngineCore

        core = EngineCore(config)
    except Exception as e:  # the front reports this to whoever started us
        outbox.send(pickle.dumps(EngineFailed(f"{type(e).__name__}: {e}")))
        log.error("engine failed to start:\n%s", traceback.format_exc())
        return
    if config.kv_role is not None:
        try:
            core.attach_connector(_connector_class(config.kv_connector).for_engine(core))
        except Exception as e:
            outbox.send(pickle.dumps(EngineFailed(f"KV connector failed to start: {type(e).__name__}: {e}")))
            return
    core.wait_grammar_compiler()
    jit_watch.serving()  # a Triton compile from here on holds a served step: logged
    mc = core.model_config
    outbox.send(pickle.dumps(EngineReady(mc.path, mc.hf, core.max_model_len, core.runner.num_pages,
                                         core.runner.page_size, mc.eos_token_ids, config.kv_role,
                                         core.connector.incarnation if core.connector else None,
                                         core.runner.kv_spec.describe(), config.parallel.ep_rank)))
    try:
        _loop(core, inbox, outbox)
    finally:
        if core.runner.ep is not None:
            core.runner.ep.close()
        inbox.close(0)
        outbox.close(0)
        ctx.term()


def _connector_class(name: str):
    """`module:Class` of a KVConnector implementation (default: kvtransfer's NIXL connector)."""
    import importlib

    module, _, cls = name.partition(":")
    return getattr(importlib.import_module(module), cls)


def _loop(core, inbox: zmq.Socket, outbox: zmq.Socket) -> None:
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    parent = os.getppid()
    ep = core.runner.ep is not None
    while True:
        if os.getppid() != parent:  # the front died without a Shutdown: leave no orphan behind
            log.warning("front process %d is gone; engine exiting", parent)
            return
        # Block while idle; poll briefly while only transfers are in flight; never wait while computing.
        # EP ranks step in lock-step (every iteration is a collective), so they only poll briefly.
        idle_wait = 2 if ep else 1000
        timeout = 0 if core.has_unfinished() else (core.kv_poll_interval_s() * 1e3 if core.has_kv_in_flight() else idle_wait)
        if 0 < timeout < 1:  # a push's tail: zmq's poll counts whole milliseconds, TTFT waits on this one
            time.sleep(timeout / 1e3)
            timeout = 0
        early: list = []
        while poller.poll(timeout):
            msg = pickle.loads(inbox.recv())
            timeout = 0
            if isinstance(msg, Shutdown):
                if not ep:
                    return
                core.stop_requested = True
                continue
            reply = _handle(core, msg, early)
            if reply is not None:
                outbox.send(pickle.dumps(reply))
        try:
            busy = core.has_unfinished() or core.has_kv_in_flight()
            outputs = early + (core.step() if busy or ep else [])
        except Exception as e:  # a bug in one step must not kill the loop: fail what was in flight
            if ep:  # the other ranks are inside the same collective: this EP group cannot go on
                log.error("EP rank step failed; exiting so the node fails its requests:\n%s", traceback.format_exc())
                raise
            log.error("engine step failed; failing in-flight requests:\n%s", traceback.format_exc())
            core.fail_all(f"engine step failed: {type(e).__name__}: {e}")
            outputs = early + core.step()
        if core.stopped:
            return
        if outputs:
            outbox.send(pickle.dumps(outputs))


def _handle(core, msg, outputs: list):
    """Apply one front message; refusals become terminal outputs; returns a direct reply if any."""
    from engine.engine_core import RequestError
    from engine.outputs import RequestOutput
    from engine.sampling_params import SamplingParams
    from engine.scheduler import SchedulerOverloaded

    def refuse(rid: str, error: str) -> None:  # every choice of the request ends
        n = msg.params.get("n", 1) if isinstance(msg.params.get("n"), int) else 1
        outputs.extend(RequestOutput(rid, [], finished=True, finish_reason="error", error=error, index=i)
                       for i in range(max(1, n)))

    if isinstance(msg, AbortRequest):
        core.abort(msg.request_id, RequestStatus(msg.status), msg.error, msg.index)
    elif isinstance(msg, AddRequest):
        try:
            params = SamplingParams.from_dict(msg.params)
            core.add_request(msg.request_id, msg.prompt_token_ids, params, msg.eos_token_ids, kv_dest=msg.kv_dest)
        except SchedulerOverloaded as e:
            refuse(msg.request_id, f"overloaded: {e}")
        except (RequestError, ValueError, TypeError) as e:
            refuse(msg.request_id, str(e))
    elif isinstance(msg, SetKVDestination):
        try:
            core.set_kv_dest(msg.request_id, msg.dest)
        except (RequestError, ValueError, TypeError) as e:
            log.warning("KV destination for %r refused: %s", msg.request_id, e)
    elif isinstance(msg, StatsRequest):
        stats = core.stats()
        stats["num_free_or_cached_pages"] = stats["num_free_pages"] + stats["num_cached_pages"]
        return Stats(msg.token, stats)
    elif isinstance(msg, AddRemoteRequest):
        try:
            dest = core.add_remote_request(msg.request_id, msg.prompt_token_ids, SamplingParams.from_dict(msg.params),
                                           msg.eos_token_ids)
            return RemoteAdded(msg.request_id, dest)
        except (RequestError, ValueError, TypeError) as e:
            return RemoteAdded(msg.request_id, None, str(e))
    return None
