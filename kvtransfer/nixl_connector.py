"""The engine's KV connector (engine/kv_connector.py) over NIXL: one per prefill- or decode-role
engine process, owning its `KVTransferAgent`.

Prefill side: during the step that computes a request's last prompt chunk, each layer's pages are
WRITTEN as soon as that layer's KV is in memory (on CUDA an event recorded after the layer gates a
sender thread, which starts once all the step's layers are launched and sends the layers done by
then as one WRITE, the rest as they complete), so the transfer overlaps the remaining layers'
compute. Once every WRITE is DONE, one notice goes to the receiver naming the transfer id and
carrying the first token (every choice's first token for an n > 1 request, whose choices share the
pushed pages). A completion thread sends that notice as soon as the last WRITE is seen DONE and the
first token is known, not at the engine loop's next poll: on a busy prefill node that poll waits for
the next step (tens of ms, 2026-12-07b's TTFT split), and the decode node would wait with it. The
engine loop's poll then only reports the push ended and frees its pages; a push that
ends otherwise (error, abort, timeout) sends an "abandoned" notice instead, so the receiver frees
its pages at once. A push is reported ended only when no WRITE from its pages is in flight.

The connection to a receiver (its agent metadata loaded, once per peer and incarnation) is made on a
connect thread as soon as a destination naming it is known (the request's admission or
`set_destination`), so that it overlaps the prompt's compute; a WRITE to a peer whose connection is
still under way waits for it, and one that failed fails the push with its error.

A destination may follow the request (`DESTINATION_FOLLOWS`): layers computed before it arrives
wait in `ready` and go out as one WRITE when it does (`set_destination`); a push still without one
at its deadline ends like a timed-out one (nothing was written, so no notice is needed).

Decode side: `destination` publishes the agent, layer addresses, the request's pages and its
transfer id; `poll` turns notices into arrivals.

Knows KV layouts, page ids and request ids/tokens; never the scheduler's queues.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from engine.kv_connector import ConnectorEvents, KVConnector, RemoteKV, SendResult, destination_known
from kvtransfer.agent import KVTransferAgent, KVTransferError, page_runs, peer_key

log = logging.getLogger(__name__)


def parse_faults(spec: str | None) -> dict:
    """Fault injection for tests, from `PDSERVE_KV_FAULTS` ("stall=S,drop=P,seed=N"): `stall`
    delays every WRITE by S seconds; `drop` loses a WRITE (and its notice) with probability P
    while the sender believes it succeeded — the worst case the receiver must survive."""
    faults = {}
    for part in (spec or "").split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            faults[k.strip()] = float(v)
    return faults


def encode_notice(transfer_id: str, first_token: int | list[int] | None) -> bytes:
    """`first_token`: one token, or (n > 1 choices) each choice's first token in choice order."""
    return json.dumps({"transfer": transfer_id, "token": first_token}).encode()


def decode_notice(message: bytes) -> tuple[str, int | list[int] | None] | None:
    try:
        note = json.loads(message)
        token = note["token"]
        if isinstance(token, list):
            return str(note["transfer"]), [int(t) for t in token]
        return str(note["transfer"]), (None if token is None else int(token))
    except (ValueError, KeyError, TypeError):
        return None


def first_tokens(request) -> int | list[int]:
    """What the notice carries: the first token, or every choice's of a forked (n > 1) request."""
    if not request.forks:
        return request.output_token_ids[0]
    return [request.output_token_ids[0]] + [c.output_token_ids[0] for c in request.forks]


# A WRITE whose post (agent lock + NIXL calls) takes longer than this is logged with its breakdown.
SLOW_POST_S = float(os.environ.get("PDSERVE_KV_SLOW_POST_S", "0.02"))
# A push whose notice goes out longer than this after its compute ended is logged with its timeline.
SLOW_PUSH_S = float(os.environ.get("PDSERVE_KV_SLOW_PUSH_S", "0.25"))


class _Throttle:
    """A warning's rate limit: at most one a second, the calls in between counted."""

    def __init__(self):
        self.at, self.calls = 0.0, 0

    def due(self, now: float) -> int:
        """0 within a second of the last warning, else the calls since it (this one included)."""
        self.calls += 1
        if now - self.at < 1.0:
            return 0
        n, self.at, self.calls = self.calls, now, 0
        return n


@dataclass
class _Push:
    """The WRITEs of one request's prompt KV (layer by layer, or all layers at once)."""
    dest: dict
    pages: list[int]
    num_layers: int
    layered: bool
    deadline: float
    start_at: float = 0.0  # not layered: when to post (fault-injected stall)
    transfers: list = field(default_factory=list)
    posted: int = 0  # layers posted (layered) or 0/1 (whole)
    ready: list = field(default_factory=list)  # layers computed while the destination was unknown
    runs: list | None = None  # page runs contiguous on both sides, once the destination is known
    pending_jobs: int = 0  # layer events queued for the sender thread
    error: str | None = None
    aborted: bool = False
    overdue_reported: bool = False
    first_post: float = 0.0
    last_post: float = 0.0
    first_layer_at: float = 0.0  # when the first layer's KV was seen written (layered pushes)
    compute_done: float = 0.0  # start_send time; 0 while the prompt still computes
    dest_at: float = 0.0  # when the destination was known here (the push's creation if it came first)
    kv_ready_at: float = 0.0  # when the last layer's KV was seen written (layered pushes)
    first_token: int | list[int] | None = None
    dropped: bool = False
    notified_at: float = 0.0  # when the completion thread sent the notice (0: not sent by it)
    notice_error: str | None = None  # that notice's failure
    lock_wait: float = 0.0  # seconds its WRITEs waited for the agent lock (summed)
    # seconds inside NIXL posting them (the peer's connection while still under way, descriptor lists,
    # initialize, transfer; summed)
    call_time: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def all_posted(self) -> bool:
        return self.posted == (self.num_layers if self.layered else 1)


class NixlConnector(KVConnector):
    def __init__(self, role: str, kv_layers: list, layout: dict, page_bytes: int, page_size: int,
                 timeout_s: float = 30.0):
        self.role = role
        self.page_size = page_size
        self.timeout_s = timeout_s
        self.incarnation = uuid.uuid4().hex[:12]
        self.agent = KVTransferAgent(role, kv_layers, layout, page_bytes)
        self.num_layers = len(kv_layers)
        self.on_cuda = kv_layers[0].device.type == "cuda"
        self.pushes: dict[str, _Push] = {}
        self.bytes_sent = 0
        self.faults = parse_faults(os.environ.get("PDSERVE_KV_FAULTS")) if role == "prefill" else {}
        self._rng = random.Random(int(self.faults.get("seed", 0)))
        if self.faults:
            log.warning("KV transfer fault injection active: %s", self.faults)
        self._nixl_lock = threading.Lock()  # the sender thread and the engine loop share the agent
        self._connections: dict[str, Future] = {}  # peer_key -> its connection, made or under way (prefill side)
        self._connections_lock = threading.Lock()
        self._connect_thread = ThreadPoolExecutor(1, thread_name_prefix="kv-connect") if role == "prefill" else None
        self._jobs: queue.Queue = queue.Queue()
        self._wake = threading.Event()  # a push may have become ready to notify
        self._slow_post_warnings, self._slow_push_warnings = _Throttle(), _Throttle()
        if role == "prefill":
            if self.on_cuda:
                threading.Thread(target=self._sender_loop, daemon=True, name="kv-layer-sender").start()
            threading.Thread(target=self._completion_loop, daemon=True, name="kv-completion").start()

    @classmethod
    def for_engine(cls, core) -> "NixlConnector":
        runner = core.runner
        return cls(core.config.kv_role, runner.kv_pool.layers, runner.kv_spec.describe(), runner.kv_spec.page_bytes,
                   runner.page_size, core.config.kv_transfer_timeout_s)

    def busy(self) -> bool:
        return bool(self.pushes)

    def poll_interval_s(self) -> float:
        tail = any(p.compute_done and destination_known(p.dest) for p in list(self.pushes.values()))
        return 0.0001 if tail else 0.001

    def stats(self) -> dict:
        return {"kv_transfers_in_flight": len(self.pushes), "kv_bytes_sent": self.bytes_sent}

    # ------------------------------------------------------------- prefill side
    def _new_push(self, request, layered: bool) -> _Push:
        pages = request.page_ids[: -(-request.num_prompt_tokens // self.page_size)]
        now = time.monotonic()
        push = _Push(request.kv_dest, list(pages), self.num_layers, layered, now + self.timeout_s)
        push.dest_at = now if destination_known(request.kv_dest) else 0.0
        self.pushes[request.request_id] = push
        request.kv_push_started = True
        return push

    def prepare_destination(self, dest: dict) -> None:
        self._connection(dest)

    def _connection(self, dest: dict) -> Future:
        """The connection to `dest`'s receiver, started on the connect thread the first time it is asked for."""
        key = peer_key(dest)
        with self._connections_lock:
            connection = self._connections.get(key)
            if connection is None:
                connection = self._connections[key] = self._connect_thread.submit(self._connect, key, dest)
        return connection

    def _connect(self, key: str, dest: dict) -> None:
        """A failed connection is forgotten (the next destination naming the peer tries again, as every
        WRITE did when it connected itself); the WRITEs waiting for it fail with its error."""
        try:
            with self._nixl_lock:
                self.agent.connect(dest)
        except Exception as e:
            with self._connections_lock:
                self._connections.pop(key, None)
            log.warning("connecting to KV receiver %s failed: %s", key, e)
            raise

    def layer_saver(self, requests: list):
        if self.faults:  # injected faults act on one whole WRITE after compute
            return None
        rids = [r.request_id for r in requests if r.request_id not in self.pushes]
        for r in requests:
            if r.request_id in rids:
                self._new_push(r, layered=True)
        if not rids:
            return None

        events: list = []  # (layer, CUDA event after it) of this step, handed over once all are launched

        def hook(layer: int) -> None:
            if not self.on_cuda:
                self._post_layers([layer], rids)
                return
            import torch

            event = torch.cuda.Event()  # the layer's KV is written when this completes on the GPU
            event.record()
            events.append((layer, event))
            if layer == self.num_layers - 1:
                # The sender thread starts only now: while the engine thread is still launching the
                # step's kernels it would wake per layer and contend for the GIL (and the CUDA driver).
                for rid in rids:
                    with self.pushes[rid].lock:
                        self.pushes[rid].pending_jobs += 1
                self._jobs.put((list(events), rids))
        return hook

    def _completion_loop(self) -> None:
        """Notify each push's receiver as soon as it can be: every WRITE DONE and the first token known."""
        while True:
            ready = [(rid, p) for rid, p in list(self.pushes.items()) if self._may_notify(p)]
            if not ready:  # woken when a prompt's compute ends; else a periodic look while pushes exist
                self._wake.wait(0.001 if self.pushes else 0.05)
                self._wake.clear()
                continue
            for rid, push in ready:
                if self._state(push.transfers) == "DONE":
                    with push.lock:
                        if self._may_notify(push):  # nothing ended it meanwhile
                            push.notice_error = self._notify(push.dest, push.first_token)
                            push.notified_at = time.monotonic()
            time.sleep(0.0001)

    def _may_notify(self, push: _Push) -> bool:
        """Whether the completion thread may send `push`'s notice once its WRITEs are DONE."""
        return (push.all_posted and push.pending_jobs == 0 and push.compute_done > 0 and not push.notified_at
                and destination_known(push.dest) and push.error is None and not push.aborted and not push.dropped
                and not push.overdue_reported and bool(push.transfers))

    def _sender_loop(self) -> None:
        while True:
            self._send_step(*self._jobs.get())

    def _send_step(self, events: list, rids: list[str]) -> None:
        """Post one step's layers for `rids` as their events (`query`/`synchronize`) complete."""
        i = 0
        while i < len(events):
            # the layers done by now go out in one WRITE; else wait for the next one
            j = i
            while j < len(events) and events[j][1].query():
                j += 1
            if j == i:
                events[i][1].synchronize()
                j = i + 1
            self._post_layers([layer for layer, _ in events[i:j]], rids)
            i = j
        for rid in rids:
            push = self.pushes.get(rid)
            if push is not None:
                with push.lock:
                    push.pending_jobs -= 1

    def _post_layers(self, layers: list[int], rids: list[str]) -> None:
        for rid in rids:
            push = self.pushes.get(rid)
            if push is None:
                continue
            with push.lock:
                now = time.monotonic()
                push.first_layer_at = push.first_layer_at or now
                if self.num_layers - 1 in layers:  # the latest chunk's last layer
                    push.kv_ready_at = now
                if destination_known(push.dest):
                    self._write(rid, push, layers)
                else:
                    push.ready.extend(layers)

    def _write(self, rid: str, push: _Push, layers: list[int] | None) -> None:
        """Post the WRITE of `layers` (None: all, in one WRITE); the caller holds `push.lock`."""
        if push.error is None and not push.aborted:
            try:
                if push.runs is None:  # once per push: a Python loop over every page (1,024 at 16k tokens)
                    push.runs = page_runs(push.pages, push.dest["page_ids"])
                t0, cpu0 = time.monotonic(), time.thread_time()
                self._connection(push.dest).result()  # made by now unless the compute was quicker
                tc = time.monotonic()
                with self._nixl_lock:  # the sender thread and the engine loop share the agent
                    t1 = time.monotonic()
                    transfer = self.agent.write(rid, push.pages, push.dest, layers=layers, runs=push.runs)
                    push.transfers.append(transfer)
                push.last_post = time.monotonic()
                push.lock_wait += t1 - tc
                push.call_time += push.last_post - t1 + tc - t0
                push.first_post = push.first_post or push.last_post
                if push.last_post - t0 > SLOW_POST_S:
                    self._log_slow_post(rid, transfer, tc - t0, t1 - tc, push.last_post - t1,
                                        time.thread_time() - cpu0)
            except (KVTransferError, ValueError) as e:
                push.error = f"KV transfer failed: {e}"
        push.posted += len(layers) if layers is not None else 1

    def _log_slow_post(self, rid: str, transfer, connect_wait: float, lock_wait: float, call: float,
                       cpu: float) -> None:
        """A warning (at most one a second, the rest counted) for a WRITE slow to post, with where its
        time went: the peer's connection (waiting for the connect thread to finish loading the peer's
        metadata, about 0 when it finished during the compute), the agent lock, and inside the call the
        address lists, NIXL's descriptor lists, initialize_xfer and transfer; and the posting thread's CPU
        time (far below the wall time: it waited, for the GIL or inside NIXL)."""
        slow_posts = self._slow_post_warnings.due(time.monotonic())
        if not slow_posts:
            return
        connect = connect_wait + transfer.phases[0]  # the call's own part: looking the connection up
        call -= transfer.phases[0]
        build, descs, init, post = (f"{1e3 * x:.1f}" for x in transfer.phases[1:])
        log.warning("slow KV WRITE post for %s: %.1f ms, %.1f ms of it on this thread's CPU (connect %.1f ms; "
                    "lock wait %.1f ms; call %.1f ms = build %s + descs %s + init %s + transfer %s ms; %d descriptors, "
                    "%d bytes; %d pushes in flight, %d slow posts since the last warning)", rid,
                    1e3 * (connect + lock_wait + call), 1e3 * cpu, 1e3 * connect, 1e3 * lock_wait, 1e3 * call, build,
                    descs, init, post, transfer.num_descs, transfer.nbytes, len(self.pushes), slow_posts)

    def set_destination(self, request) -> None:
        self.prepare_destination(request.kv_dest)
        push = self.pushes.get(request.request_id)
        if push is None:  # not computed yet: its push starts with the destination known
            return
        with push.lock:
            push.dest, push.dest_at = request.kv_dest, time.monotonic()
            if push.ready:
                ready, push.ready = push.ready, []
                self._write(request.request_id, push, ready)

    def abandon(self, dest: dict) -> None:
        """The "abandoned" notice to `dest`'s receiver (none without a destination: the receiver is
        told when one comes, through this method)."""
        if not destination_known(dest):
            return
        error = self._notify(dest, None)
        if error:
            log.warning("abandon notice for transfer %s: %s", dest.get("transfer_id"), error)

    def owns_notice(self, request_id: str) -> bool:
        push = self.pushes.get(request_id)
        return push is not None and destination_known(push.dest)

    def start_send(self, request) -> None:
        push = self.pushes.get(request.request_id) or self._new_push(request, layered=False)
        now = time.monotonic()
        with push.lock:
            push.compute_done, push.first_token = now, first_tokens(request)
            push.deadline = now + self.timeout_s
            if not push.layered:
                push.start_at = now + self.faults.get("stall", 0.0)
                if self.faults.get("drop", 0) and self._rng.random() < self.faults["drop"]:
                    push.dropped = True  # injected: lost, but the sender believes it done
        self._wake.set()

    def abort_send(self, request) -> None:
        push = self.pushes.get(request.request_id)
        if push is not None:
            with push.lock:  # the completion thread checks it under this lock before notifying
                push.aborted = True
        else:  # nothing posted: tell the receiver at once
            self.abandon(request.kv_dest)

    def _notify(self, dest: dict, first_token: int | None) -> str | None:
        try:
            with self._nixl_lock:
                self.agent.notify(dest, encode_notice(dest["transfer_id"], first_token))
            return None
        except Exception as e:  # noqa: BLE001 — any failure means the KV never counts as arrived
            return f"KV notification failed: {e}"

    def _progress(self, rid: str, push: _Push, now: float) -> SendResult | None:
        """Post what is due, poll what is in flight; a result when the push ended or became overdue."""
        if push.dropped:
            self.pushes.pop(rid)
            return SendResult(stats={"bytes": 0, "seconds": 0.0, "descriptors": 0, "dropped": True})
        if (not push.layered and push.posted == 0 and push.compute_done and not push.aborted and now >= push.start_at
                and destination_known(push.dest)):
            with push.lock:
                self._write(rid, push, None)
        with push.lock:
            transfers, error, pending = list(push.transfers), push.error, push.pending_jobs
        state = self._state(transfers)
        if state == "ERR":
            error = error or "KV transfer failed (NIXL reported an error)"
        in_flight = pending > 0 or state == "PROC"
        ended = push.aborted or error is not None
        complete = push.compute_done and push.all_posted
        if in_flight or not (ended or complete):
            if now > push.deadline and not push.overdue_reported and not push.aborted:
                with push.lock:  # not while the completion thread is telling the receiver it arrived
                    if push.notified_at:
                        return self._notified(rid, push, transfers)
                    push.overdue_reported = True
                timeout = (f"KV transfer timed out after {self.timeout_s:.0f} s" if destination_known(push.dest)
                           else f"no KV destination arrived within {self.timeout_s:.0f} s")
                if not in_flight:  # nothing will land: end it now
                    self.pushes.pop(rid)
                    self.abandon(push.dest)
                    return SendResult(error=timeout)
                return SendResult(error=timeout, in_flight=True)
            return None
        with push.lock:  # the completion thread notifies under this lock: one of the two does
            if push.notified_at:
                return self._notified(rid, push, transfers)
            self.pushes.pop(rid)
            if ended or push.overdue_reported:
                self.abandon(push.dest)
                return SendResult(error=error or "KV transfer abandoned")
            error = self._notify(push.dest, push.first_token)
        return SendResult(error=error, stats=self._stats(push, transfers, now))

    def _state(self, transfers: list) -> str:
        """PROC while any of the WRITEs is in flight, else ERR if one failed, else DONE. The scan stops
        at the first WRITE in flight, oldest first (they finish about in posting order): one NIXL call per
        push and poll instead of one per WRITE, under the agent lock the sender posts through (served
        V2-Lite at 4-8 req/s timed the same either way, bench/results/2026-12-07j_push_ab.md). The agent
        keeps a finished WRITE's state; the engine loop and the completion thread share the agent."""
        failed = False
        with self._nixl_lock:
            for t in transfers:
                st = self.agent.poll(t)
                if st == "PROC":
                    return st
                failed = failed or st == "ERR"
        return "ERR" if failed else "DONE"

    def _notified(self, rid: str, push: _Push, transfers: list) -> SendResult:
        """The end of a push whose notice the completion thread sent (an abort after it came too late
        to stop the receiver; the request still ends aborted here)."""
        self.pushes.pop(rid)
        error = push.notice_error or ("KV transfer abandoned" if push.aborted else None)
        return SendResult(error=error, stats=self._stats(push, transfers, push.notified_at))

    def _log_slow_push(self, push: _Push, writes: int, nbytes: int, now: float) -> None:
        """The timeline of a push noticed `SLOW_PUSH_S` or more after its compute ended (`now`: the notice)."""
        t0 = push.compute_done

        def at(t: float) -> str:
            return f"{1e3 * (t - t0):+.1f}" if t else "-"

        log.warning("slow KV push: notice %.1f ms after its compute ended; ms from then: destination %s, first "
                    "layer seen %s, first post %s, last layer seen %s, last post %s, notice %s; %d WRITEs "
                    "(lock wait %.1f ms, in NIXL %.1f ms), %d bytes, %d pushes in flight",
                    1e3 * (now - t0), at(push.dest_at), at(push.first_layer_at), at(push.first_post),
                    at(push.kv_ready_at), at(push.last_post), at(now), writes, 1e3 * push.lock_wait,
                    1e3 * push.call_time, nbytes, len(self.pushes))

    def _stats(self, push: _Push, transfers: list, now: float) -> dict:
        """A completed push's figures; `now`: when its notice went out."""
        nbytes = sum(t.nbytes for t in transfers)
        self.bytes_sent += nbytes
        if now - (push.compute_done or now) > SLOW_PUSH_S and self._slow_push_warnings.due(now):
            self._log_slow_push(push, len(transfers), nbytes, now)
        return {"bytes": nbytes, "seconds": max(now - push.first_post, 1e-9),
                 "descriptors": sum(t.num_descs for t in transfers), "writes": len(transfers),
                 # posting the WRITEs: waiting for the agent lock (the completion thread and the engine loop
                 # poll under it) and inside NIXL's calls, summed over the push
                 "write_lock_wait_seconds": push.lock_wait, "write_call_seconds": push.call_time,
                 "exposed_seconds": max(0.0, now - push.compute_done), "layers": push.num_layers,
                 # how long the written KV waited for D's destination: from the last layer's KV seen
                 # written (layered) or the end of the compute, to the destination's arrival
                 "destination_wait_seconds": max(0.0, push.dest_at - (push.kv_ready_at or push.compute_done)),
                 # from the last WRITE posted to all of them seen done (the wire and the completion polling)
                 "write_tail_seconds": max(0.0, now - push.last_post),
                 # from the first WRITE possible (first layer written and the destination known) to its post
                 "post_delay_seconds": max(0.0, push.first_post - max(push.dest_at, push.first_layer_at
                                                                      or push.compute_done))}

    # ------------------------------------------------------------- decode side
    def destination(self, request) -> dict:
        dest = self.agent.destination()
        dest.update(request_id=request.request_id, page_ids=list(request.page_ids), incarnation=self.incarnation,
                    transfer_id=request.kv_transfer_id)
        return dest

    # ------------------------------------------------------------- both
    def poll(self) -> ConnectorEvents:
        events = ConnectorEvents()
        now = time.monotonic()
        for rid, push in list(self.pushes.items()):
            result = self._progress(rid, push, now)
            if result is not None:
                events.sent[rid] = result
        if self.role == "decode":
            try:
                messages = self.agent.notifications()
            except KVTransferError as e:  # a peer gone mid-read: its requests end at their deadline
                log.warning("reading KV notices failed: %s", e)
                messages = []
            for message in messages:
                notice = decode_notice(message)
                if notice is None:
                    log.warning("ignoring a malformed KV notice: %r", message[:80])
                    continue
                events.arrived[notice[0]] = RemoteKV(notice[1])
        return events
