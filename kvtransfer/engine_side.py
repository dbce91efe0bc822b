"""The KV-transfer half of an engine process in the prefill or decode role.

Prefill role: a request added with a destination keeps its pages after its first token
(`kv_hold`). During the step that computes its last prompt chunk, each layer's pages are WRITTEN
as soon as that layer's KV is in memory (a per-layer hook; on CUDA an event recorded after the
layer gates a sender thread), so the transfer overlaps the remaining layers' compute. The
request's final output is held back until every WRITE is DONE; then one notification naming the
request goes to the receiver and the output is released with the transfer's bytes, time and the
part of it not hidden behind compute. A failed or overdue transfer ends the request with an error.
Pages are freed only when no WRITE from them is in flight.

Decode role: `reserve` hands out pages plus this agent's address; `start` queues the request
until the prefill node's notification naming it arrives, then joins it to the running batch.
A reservation that is abandoned before its notification arrived may still be written into, so
its pages stay quarantined for one more timeout before they are reused.
"""
from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

from kvtransfer.agent import KVTransferAgent, KVTransferError, Transfer

log = logging.getLogger(__name__)


@dataclass
class _LayerPush:
    """The per-layer WRITEs of one request, posted while its last prompt chunk computes."""
    dest: dict
    pages: list[int]
    num_layers: int
    transfers: list = field(default_factory=list)
    posted: int = 0
    error: str | None = None
    first_post: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Sending:
    transfer: Transfer | None  # None while a (fault-injected) stall delays the WRITE
    output: object  # the held final EngineOutput
    started: float
    deadline: float
    reported: bool = False
    aborted: bool = False
    pages: list[int] | None = None
    dest: dict | None = None
    start_at: float = 0.0
    push: _LayerPush | None = None  # layer-by-layer WRITEs instead of one `transfer`
    compute_done: float = 0.0


def parse_faults(spec: str | None) -> dict:
    """Fault injection for tests, from `PDSERVE_KV_FAULTS` ("stall=S,drop=P,seed=N"): `stall`
    delays every WRITE by S seconds; `drop` loses a WRITE (and its notification) with probability
    P while the sender believes it succeeded — the worst case the receiver must survive."""
    faults = {}
    for part in (spec or "").split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            faults[k.strip()] = float(v)
    return faults


@dataclass
class _Waiting:
    prompt_token_ids: list[int]
    params: object
    first_token: int
    eos_token_ids: tuple[int, ...] | None
    deadline: float


@dataclass
class EngineKVTransfer:
    core: object
    role: str  # prefill | decode
    timeout_s: float = 30.0
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self):
        runner = self.core.runner
        self.agent = KVTransferAgent(self.role, runner.kv_pool.layers, runner.kv_spec.describe(),
                                     runner.kv_spec.page_bytes)
        self.dests: dict[str, dict] = {}
        self.sending: dict[str, _Sending] = {}
        self.waiting: dict[str, _Waiting] = {}
        self.arrived: set[str] = set()
        self.quarantine: dict[str, float] = {}
        self.bytes_sent = 0
        self.faults = parse_faults(os.environ.get("PDSERVE_KV_FAULTS")) if self.role == "prefill" else {}
        self._rng = random.Random(int(self.faults.get("seed", 0)))
        if self.faults:
            log.warning("KV transfer fault injection active: %s", self.faults)
        self.pushes: dict[str, _LayerPush] = {}
        self._nixl_lock = threading.Lock()  # the sender thread and the engine loop share the agent
        self._jobs: queue.Queue = queue.Queue()
        if self.role == "prefill" and not self.faults:
            self.core.layer_hook_factory = self.layer_hook
            if runner.device.type == "cuda":
                threading.Thread(target=self._sender_loop, daemon=True, name="kv-layer-sender").start()

    def busy(self) -> bool:
        return bool(self.sending or self.waiting or self.quarantine)

    # ------------------------------------------------------------- prefill role
    def expect_send(self, request_id: str, dest: dict) -> None:
        self.dests[request_id] = dest

    def layer_hook(self, chunks: list):
        """Per-layer callback for a step whose chunks finish a prompt that must be sent (else None)."""
        import torch

        rids = []
        for c in chunks:
            rid = c.request.request_id
            if c.sample and c.request.kv_hold and rid in self.dests and rid not in self.pushes:
                pages = c.request.page_ids[: -(-(c.start + c.num_new_tokens) // self.core.runner.page_size)]
                self.pushes[rid] = _LayerPush(self.dests[rid], list(pages), len(self.core.runner.kv_pool.layers))
                rids.append(rid)
        if not rids:
            return None
        on_cuda = self.core.runner.device.type == "cuda"

        def hook(layer: int) -> None:
            if on_cuda:  # the layer's KV is written when this event completes on the GPU
                event = torch.cuda.Event()
                event.record()
                self._jobs.put((layer, event, rids))
            else:
                self._post_layer(layer, rids)
        return hook

    def _sender_loop(self) -> None:
        while True:
            layer, event, rids = self._jobs.get()
            event.synchronize()
            self._post_layer(layer, rids)

    def _post_layer(self, layer: int, rids: list[str]) -> None:
        for rid in rids:
            push = self.pushes.get(rid)
            if push is None:
                continue
            with push.lock:
                if push.error is None:
                    try:
                        with self._nixl_lock:
                            t = self.agent.write(rid, push.pages, push.dest, b"", layers=[layer])
                        push.transfers.append(t)
                        push.first_post = push.first_post or time.monotonic()
                    except (KVTransferError, ValueError) as e:
                        push.error = f"KV transfer failed: {e}"
                push.posted += 1

    def take_outputs(self, outputs: list) -> list:
        """Hold back the final output of requests whose KV must be sent; start their WRITEs."""
        emit = []
        for out in outputs:
            dest = self.dests.get(out.request_id)
            if dest is None or not out.finished:
                emit.append(out)
                continue
            self.dests.pop(out.request_id)
            pages = self.core.scheduler.held.get(out.request_id)
            push = self.pushes.get(out.request_id)
            now = time.monotonic()
            if pages is None:  # aborted or failed before finishing: nothing to send
                if push is not None:  # WRITEs may still read its pages: wait for them to end
                    self.sending[out.request_id] = _Sending(None, out, now, now + self.timeout_s, push=push,
                                                            aborted=True, compute_done=now)
                else:
                    emit.append(out)
                continue
            if push is not None:
                self.sending[out.request_id] = _Sending(None, out, now, now + self.timeout_s, push=push,
                                                        compute_done=now)
                continue
            if self.faults.get("drop", 0) and self._rng.random() < self.faults["drop"]:
                self.core.release_held(out.request_id)  # injected: the WRITE is lost, the sender thinks it is done
                out.kv_transfer = {"bytes": 0, "seconds": 0.0, "descriptors": 0, "dropped": True}
                emit.append(out)
                continue
            sending = _Sending(None, out, now, now + self.timeout_s, pages=pages, dest=dest,
                               start_at=now + self.faults.get("stall", 0.0))
            self.sending[out.request_id] = sending
            if not self._start(out.request_id, sending):
                emit.append(out)
        return emit

    def _start(self, request_id: str, s: _Sending) -> bool:
        """Post the WRITE when its (injected) start time has come; False if it failed at once."""
        if s.transfer is not None or time.monotonic() < s.start_at:
            return True
        try:
            s.transfer = self.agent.write(request_id, s.pages, s.dest, request_id.encode())
            return True
        except (KVTransferError, ValueError) as e:
            self.sending.pop(request_id, None)
            self.core.release_held(request_id)
            s.output.finish_reason, s.output.error = "error", f"KV transfer failed: {e}"
            return False

    def abort_sending(self, request_id: str) -> bool:
        s = self.sending.get(request_id)
        if s is None:
            self.dests.pop(request_id, None)
            return False
        s.aborted = True
        return True

    # ------------------------------------------------------------- decode role
    def reserve(self, request_id: str, num_prompt_tokens: int) -> dict:
        pages = self.core.reserve(request_id, num_prompt_tokens)
        dest = self.agent.destination()
        dest.update(request_id=request_id, page_ids=pages, incarnation=self.incarnation)
        return dest

    def start(self, request_id: str, prompt_token_ids, params, first_token: int, eos_token_ids) -> None:
        if request_id not in self.core.scheduler.reserved:
            raise ValueError(f"request {request_id!r} has no KV reservation (expired or never made)")
        self.waiting[request_id] = _Waiting(list(prompt_token_ids), params, first_token, eos_token_ids,
                                            time.monotonic() + self.timeout_s)

    def abort_reservation(self, request_id: str) -> bool:
        """End a reservation; pages a WRITE may still target stay quarantined for a timeout."""
        self.waiting.pop(request_id, None)
        if request_id not in self.core.scheduler.reserved:
            return False
        if request_id in self.arrived:
            self.arrived.discard(request_id)
            self.core.cancel_reservation(request_id)
        else:
            self.quarantine[request_id] = time.monotonic() + self.timeout_s
        return True

    def _poll_push(self, rid: str, s: _Sending, now: float):
        """Progress of a layer-by-layer push; returns the output to emit when it is over."""
        push = s.push
        with push.lock:
            posted_all = push.posted == push.num_layers
            transfers = list(push.transfers)
            error = push.error
        with self._nixl_lock:
            states = [self.agent.poll(t) if not getattr(t, "done", False) else "DONE" for t in transfers]
        for t, st in zip(transfers, states):
            if st in ("DONE", "ERR"):
                t.done = True
            if st == "ERR":
                error = error or "KV transfer failed (NIXL reported an error)"
        in_flight = any(st == "PROC" for st in states)
        if in_flight or not posted_all:
            if now > s.deadline and not s.reported:
                s.reported = True  # the client hears now; pages wait until no WRITE is in flight
                s.output.finish_reason, s.output.error = "error", f"KV transfer timed out after {self.timeout_s:.0f} s"
                return s.output
            return None
        self.sending.pop(rid)
        self.pushes.pop(rid, None)
        if s.reported:
            self.core.release_held(rid)
            return None
        out = s.output
        if s.aborted or error:
            self.core.release_held(rid)
            if error and not s.aborted:
                out.finish_reason, out.error = "error", error
            return out
        try:
            with self._nixl_lock:
                self.agent.notify(push.dest, rid.encode())
        except Exception as e:  # noqa: BLE001 — any failure to notify means the KV never counts as arrived
            out.finish_reason, out.error = "error", f"KV notification failed: {e}"
        self.core.release_held(rid)
        nbytes = sum(t.nbytes for t in transfers)
        self.bytes_sent += nbytes
        total = max(now - push.first_post, 1e-9) if push.first_post else 0.0
        exposed = max(0.0, now - s.compute_done)
        out.kv_transfer = {"bytes": nbytes, "seconds": total, "descriptors": sum(t.num_descs for t in transfers),
                           "exposed_seconds": exposed, "layers": push.num_layers}
        return out

    # ------------------------------------------------------------- both: progress
    def poll(self, terminal) -> list:
        """Advance transfers; returns outputs to emit. `terminal(rid, reason, error)` builds an output."""
        emit = []
        now = time.monotonic()
        for rid, s in list(self.sending.items()):
            if s.push is not None:
                out = self._poll_push(rid, s, now)
                if out is not None:
                    emit.append(out)
                continue
            if s.transfer is None:  # not posted yet (stall)
                if now > s.deadline:  # nothing in flight: free at once and report the timeout
                    self.sending.pop(rid)
                    self.core.release_held(rid)
                    if not s.reported:
                        s.output.finish_reason = "abort" if s.aborted else "error"
                        s.output.error = None if s.aborted else f"KV transfer timed out after {self.timeout_s:.0f} s"
                        emit.append(s.output)
                elif not self._start(rid, s):
                    emit.append(s.output)
                continue
            state = self.agent.poll(s.transfer)
            if state in ("DONE", "ERR"):
                self.sending.pop(rid)
                self.core.release_held(rid)
                if s.reported:
                    continue
                out = s.output
                if s.aborted:
                    out.finish_reason, out.error = "abort", None
                elif state == "ERR":
                    out.finish_reason, out.error = "error", "KV transfer failed (NIXL reported an error)"
                else:
                    self.bytes_sent += s.transfer.nbytes
                    out.kv_transfer = {"bytes": s.transfer.nbytes, "seconds": now - s.started,
                                       "descriptors": s.transfer.num_descs}
                emit.append(out)
            elif now > s.deadline and not s.reported:
                s.reported = True  # the client hears now; the pages wait for the WRITE to end
                out = s.output
                out.finish_reason, out.error = "error", f"KV transfer timed out after {self.timeout_s:.0f} s"
                emit.append(out)
        if self.role == "decode":
            for note in self.agent.notifications():
                rid = note.decode(errors="replace")
                if rid in self.quarantine:
                    self.quarantine.pop(rid)
                    self.core.cancel_reservation(rid)
                elif rid in self.core.scheduler.reserved:
                    self.arrived.add(rid)
            for rid, w in list(self.waiting.items()):
                if rid in self.arrived:
                    self.waiting.pop(rid)
                    self.arrived.discard(rid)
                    emit.extend(self.core.add_prefilled(rid, w.prompt_token_ids, w.params, w.first_token,
                                                        w.eos_token_ids))
                elif now > w.deadline:
                    self.waiting.pop(rid)
                    self.quarantine[rid] = now + self.timeout_s
                    emit.append(terminal(rid, "error", f"KV for request {rid!r} did not arrive within "
                                                       f"{self.timeout_s:.0f} s"))
            for rid, until in list(self.quarantine.items()):
                if now > until:
                    self.quarantine.pop(rid)
                    self.core.cancel_reservation(rid)
        return emit
