"""Moving KV pages between nodes with NIXL (UCX backend): DRAM on CPU, VRAM on GPU.

Each engine process that sends or receives KV owns one `KVTransferAgent`: the KV pool's layer
tensors are registered once at start-up; the receiving side publishes its agent metadata, layer
base addresses and KV layout (`destination()`); the sending side checks the layout, connects to
that agent (keyed by name + incarnation, so a restarted peer is a new connection) and WRITEs
page runs layer by layer with a notification naming the request and transfer. Layouts that
differ are refused on both sides with the reason.

This module knows a KV layout description (`KVCacheSpec.describe()`), addresses and page ids;
nothing about models or requests beyond their ids.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

log = logging.getLogger(__name__)


class KVLayoutMismatch(ValueError):
    """The two sides' KV layouts differ; neither side may transfer."""


class KVTransferError(RuntimeError):
    """A connection, WRITE or notification failed (NIXL's own errors, e.g. a peer that disconnected, become this)."""


def _nixl_errors(what: str):
    """Decorator: any NIXL exception from `what` becomes a KVTransferError naming it."""
    def wrap(fn):
        def call(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except (KVTransferError, KVLayoutMismatch):
                raise
            except Exception as e:  # noqa: BLE001 — NIXL raises its own types (nixlRemoteDisconnectError...)
                raise KVTransferError(f"NIXL {what} failed: {type(e).__name__}: {e}") from e
        return call
    return wrap


def check_layouts(local: dict, remote: dict) -> None:
    diffs = [f"{k}: ours {local.get(k)!r} vs theirs {remote.get(k)!r}" for k in sorted(set(local) | set(remote))
             if local.get(k) != remote.get(k)]
    if diffs:
        raise KVLayoutMismatch("KV layouts differ (" + "; ".join(diffs) + ")")


def peer_key(dest: dict) -> str:
    """A receiver's connection key: a restarted peer (new incarnation) is a new connection."""
    return f"{dest['agent_name']}/{dest.get('incarnation', '')}"


def page_runs(local_pages: list[int], remote_pages: list[int]) -> list[tuple[int, int, int]]:
    """Coalesce page pairs into runs `(local_start, remote_start, length)` contiguous on both sides."""
    runs: list[list[int]] = []
    for lp, rp in zip(local_pages, remote_pages):
        if runs and lp == runs[-1][0] + runs[-1][2] and rp == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([lp, rp, 1])
    return [tuple(r) for r in runs]


@dataclass
class Transfer:
    request_id: str
    handle: object
    nbytes: int
    num_descs: int
    state: str = "PROC"  # DONE or ERR once a poll saw it end (its handle is then released)
    # seconds in `write`: connect (loading the peer's metadata if it is not connected yet; the connector
    # connects ahead, so a lookup), build, descs, init, transfer (the connector logs them for a slow post)
    phases: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)


def _nixl_api():
    """`nixl` (the meta package) picks its CUDA build; a lone nixl-cu13/cu12 wheel works too."""
    import importlib

    for name in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("NIXL is not installed (pip install nixl)")


class KVTransferAgent:
    def __init__(self, role: str, layers: list, layout: dict, page_bytes: int):
        api = _nixl_api()
        nixl_agent, nixl_agent_config = api.nixl_agent, api.nixl_agent_config

        self.name = f"pdserve-{role}-{uuid.uuid4().hex[:12]}"
        self.layout = dict(layout)
        self.page_bytes = page_bytes
        self.layers = layers
        self.mem_type = "VRAM" if layers[0].device.type == "cuda" else "DRAM"
        self.dev_id = layers[0].device.index or 0 if layers[0].device.type == "cuda" else 0
        # NIXL's progress thread spins a CPU core per agent even when idle. GPU nodes keep it (a
        # core per GPU process, and one-sided NVLink/RDMA WRITEs complete without the target's
        # help); DRAM agents (CPU nodes, tests) run without it and progress when the engine loop
        # polls transfers and notifications — every millisecond while anything is in flight.
        progress_thread = self.mem_type == "VRAM"
        self.agent = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"]))
        self._reg = self.agent.register_memory(layers)
        self.layer_addrs = [t.data_ptr() for t in layers]
        self._remotes: dict[str, str] = {}  # "name/incarnation" -> remote agent name

    # ------------------------------------------------------------- receiving side
    def destination(self) -> dict:
        return {"agent_name": self.name, "agent_metadata": self.agent.get_agent_metadata(),
                "layer_addrs": list(self.layer_addrs), "layout": dict(self.layout), "dev_id": self.dev_id}

    @_nixl_errors("notification read")
    def notifications(self) -> list[bytes]:
        msgs = []
        for _, notes in self.agent.get_new_notifs().items():
            msgs.extend(notes)
        return msgs

    # ------------------------------------------------------------- sending side
    @_nixl_errors("connect")
    def connect(self, dest: dict) -> str:
        """Check the layouts and load the receiver's agent metadata once per `peer_key` (200 ms of the
        sender's CPU on an H100, 2026-12-07o); the remote agent's name. The NIXL agent is not
        thread-safe (sync mode NONE): callers serialise every call on it, this one included."""
        check_layouts(self.layout, dest["layout"])
        key = peer_key(dest)
        if key not in self._remotes:
            name = self.agent.add_remote_agent(dest["agent_metadata"])
            name = name.decode() if isinstance(name, bytes) else name
            self._remotes[key] = name
        return self._remotes[key]

    @_nixl_errors("write")
    def write(self, request_id: str, local_pages: list[int], dest: dict, notif: bytes = b"",
              layers: list[int] | None = None, runs: list[tuple[int, int, int]] | None = None) -> Transfer:
        """Start WRITEs of `local_pages` into the destination's pages (same order) for `layers`
        (default: all), with `notif` delivered to the receiver when this WRITE completes. `runs`:
        `page_runs(local_pages, dest pages)` when the caller has it (one request's layers share it)."""
        remote_pages = list(dest["page_ids"])
        if len(remote_pages) < len(local_pages):
            raise KVTransferError(f"request {request_id!r}: {len(local_pages)} pages to send but only "
                                  f"{len(remote_pages)} reserved at the destination")
        tc = time.monotonic()
        remote = self.connect(dest)
        remote_addrs = dest["layer_addrs"]
        if len(remote_addrs) != len(self.layer_addrs):
            raise KVLayoutMismatch(f"destination has {len(remote_addrs)} layers, we have {len(self.layer_addrs)}")
        t0 = time.monotonic()
        pb = self.page_bytes
        runs = page_runs(local_pages, remote_pages) if runs is None else runs
        src, dst = [], []
        for layer in (range(len(self.layer_addrs)) if layers is None else layers):
            lbase, rbase = self.layer_addrs[layer], remote_addrs[layer]
            for lp, rp, n in runs:
                src.append((lbase + lp * pb, n * pb, self.dev_id))
                dst.append((rbase + rp * pb, n * pb, int(dest.get("dev_id", 0))))
        t1 = time.monotonic()
        src_descs = self.agent.get_xfer_descs(src, self.mem_type)
        dst_descs = self.agent.get_xfer_descs(dst, self.mem_type)
        t2 = time.monotonic()
        handle = self.agent.initialize_xfer("WRITE", src_descs, dst_descs, remote, notif)
        t3 = time.monotonic()
        state = self.agent.transfer(handle)
        if state == "ERR":
            self.agent.release_xfer_handle(handle)
            raise KVTransferError(f"request {request_id!r}: NIXL refused the transfer")
        return Transfer(request_id, handle, sum(d[1] for d in src), len(src),
                        phases=(t0 - tc, t1 - t0, t2 - t1, t3 - t2, time.monotonic() - t3))

    @_nixl_errors("notification")
    def notify(self, dest: dict, message: bytes) -> None:
        """A notification alone (after every WRITE of a request is DONE)."""
        self.agent.send_notif(self.connect(dest), message)

    def poll(self, transfer: Transfer) -> str:
        """DONE, PROC or ERR; a finished transfer's handle is released and its state kept, so a later
        poll (the connector's engine loop and its completion thread both poll) answers without it."""
        if transfer.state != "PROC":
            return transfer.state
        try:
            state = self.agent.check_xfer_state(transfer.handle)
        except Exception:  # noqa: BLE001 — e.g. the peer disconnected mid-transfer
            state = "ERR"
        if state in ("DONE", "ERR"):
            self.agent.release_xfer_handle(transfer.handle)
            transfer.state = state
        return state
