"""The KV-transfer half of an engine process in the prefill or decode role.

Prefill role: a request added with a destination keeps its pages after its first token
(`kv_hold`); its final output is held back while the pages are written to the destination, and
released (with transfer bytes and time) once NIXL reports DONE — or as an error if the transfer
fails or outlives its deadline. Pages are freed only when the WRITE is no longer in flight.

Decode role: `reserve` hands out pages plus this agent's address; `start` queues the request
until the prefill node's notification naming it arrives, then joins it to the running batch.
A reservation that is abandoned before its notification arrived may still be written into, so
its pages stay quarantined for one more timeout before they are reused.
"""
from __future__ import annotations

import logging
import os
import random
import time
import uuid
from dataclasses import dataclass, field

from kvtransfer.agent import KVTransferAgent, KVTransferError, Transfer

log = logging.getLogger(__name__)


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

    def busy(self) -> bool:
        return bool(self.sending or self.waiting or self.quarantine)

    # ------------------------------------------------------------- prefill role
    def expect_send(self, request_id: str, dest: dict) -> None:
        self.dests[request_id] = dest

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
            if pages is None:  # aborted or failed before finishing: nothing to send
                emit.append(out)
                continue
            now = time.monotonic()
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

    # ------------------------------------------------------------- both: progress
    def poll(self, terminal) -> list:
        """Advance transfers; returns outputs to emit. `terminal(rid, reason, error)` builds an output."""
        emit = []
        now = time.monotonic()
        for rid, s in list(self.sending.items()):
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
