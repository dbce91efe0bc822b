"""The engine loop in its own process (one per GPU rank), fed over ZMQ.

CPU/GPU separation from the seed talks: the front process tokenizes, detokenizes and serves the
API; this process only admits requests, steps the engine and ships token deltas back, so Python
work in the front never stalls the GPU. Messages are small typed tuples pickled over ZMQ:

    front → engine:  AddRequest | AbortRequest | Shutdown
    engine → front:  EngineReady | EngineFailed (startup) | list[EngineOutput] (one per step)
"""
from __future__ import annotations

import logging
import pickle
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


@dataclass
class AbortRequest:
    request_id: str
    status: str = RequestStatus.FINISHED_ABORTED.value
    error: str | None = None


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
    try:
        from engine.engine_core import EngineCore

        core = EngineCore(config)
    except Exception as e:  # the front reports this to whoever started us
        outbox.send(pickle.dumps(EngineFailed(f"{type(e).__name__}: {e}")))
        log.error("engine failed to start:\n%s", traceback.format_exc())
        return
    mc = core.model_config
    outbox.send(pickle.dumps(EngineReady(mc.path, mc.hf, core.max_model_len, core.runner.num_pages,
                                         core.runner.page_size, mc.eos_token_ids)))
    try:
        _loop(core, inbox, outbox)
    finally:
        inbox.close(0)
        outbox.close(0)
        ctx.term()


def _loop(core, inbox: zmq.Socket, outbox: zmq.Socket) -> None:
    from engine.engine_core import EngineOutput, RequestError
    from engine.sampling_params import SamplingParams
    from engine.scheduler import SchedulerOverloaded

    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    while True:
        # Block while idle; only drain what is queued while requests are running.
        timeout = 0 if core.has_unfinished() else 1000
        refused: list[EngineOutput] = []
        while poller.poll(timeout):
            msg = pickle.loads(inbox.recv())
            timeout = 0
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, AbortRequest):
                core.abort(msg.request_id, RequestStatus(msg.status), msg.error)
            elif isinstance(msg, AddRequest):
                try:
                    params = SamplingParams.from_dict(msg.params)
                    core.add_request(msg.request_id, msg.prompt_token_ids, params, msg.eos_token_ids)
                except SchedulerOverloaded as e:
                    refused.append(EngineOutput(msg.request_id, [], finished=True, finish_reason="error",
                                                error=f"overloaded: {e}"))
                except (RequestError, ValueError, TypeError) as e:
                    refused.append(EngineOutput(msg.request_id, [], finished=True, finish_reason="error",
                                                error=str(e)))
        try:
            outputs = refused + core.step()
        except Exception as e:  # a bug in one step must not kill the loop: fail what was in flight
            log.error("engine step failed; failing in-flight requests:\n%s", traceback.format_exc())
            core.fail_all(f"engine step failed: {type(e).__name__}: {e}")
            outputs = refused + core.step()
        if outputs:
            outbox.send(pickle.dumps(outputs))
