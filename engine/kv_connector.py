"""The KV connector: the engine's interface for handing a prompt's KV from a prefill engine to a
decode engine. The engine owns it; `kvtransfer/` implements it (NIXL). The scheduler keeps the
hand-off as request states (WAITING_FOR_REMOTE_KV on decode, SENDING_KV on prefill) with the
pages on the request; the connector only moves bytes and reports what finished. It never sees
scheduler queues, only `Request` objects the engine hands it.

Prefill side (sender): `layer_saver` gives a per-layer callback for a step that computes the last
prompt chunk of requests with a destination (the WRITE of a layer starts as soon as that layer's
KV is in memory); `start_send` says the request is computed and its first token sampled (the
notice to the receiver carries that token, or with n > 1 choices the first token of each: the
`forks` of the request); `abort_send` gives up. `poll` reports sends that
ended: only then may the request's pages be freed (no WRITE from them is in flight).

The destination may follow the request (SGLang's bootstrap: the prefill starts while the decode
engine still reserves pages): such a request carries `kv_dest == {}` (`DESTINATION_FOLLOWS`) until
`set_destination`; layers computed before it are written as soon as it comes. A push that
never gets one ends at its deadline like any other; a destination for a request that already
ended is answered with an "abandoned" notice (`abandon`), so the receiver frees its pages at once.

Decode side (receiver): `destination` describes where a request's prompt KV must be written
(agent, addresses, pages, a transfer id naming this one write); `poll` reports transfer ids whose
KV arrived (with the first token) or that their sender abandoned.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable


DESTINATION_FOLLOWS: dict = {}  # `kv_dest` of a request whose destination is not known yet (compare with ==)


def destination_known(kv_dest: dict | None) -> bool:
    return bool(kv_dest)


@dataclass
class SendResult:
    """How a request's KV push ended (prefill side)."""

    error: str | None = None  # None: every WRITE done and the receiver notified
    stats: dict | None = None  # bytes / seconds / descriptors / exposed seconds
    in_flight: bool = False  # overdue but WRITEs still in flight: the request fails now, a final report follows


@dataclass
class RemoteKV:
    """A notice from a prefill engine about one transfer id (decode side)."""

    # None: the sender abandoned the transfer (nothing more will be written); a list: each choice's
    # first token of an n > 1 request (choice order), which forks on arrival
    first_token: int | list[int] | None


@dataclass
class ConnectorEvents:
    sent: dict[str, SendResult] = field(default_factory=dict)  # request id -> result
    arrived: dict[str, RemoteKV] = field(default_factory=dict)  # transfer id -> notice


class KVConnector(abc.ABC):
    role: str  # "prefill" | "decode"
    incarnation: str  # changes on every start; peers key remote state by it

    # ------------------------------------------------------------- prefill side
    def layer_saver(self, requests: list) -> Callable[[int], None] | None:
        """Per-layer callback for a step computing the last prompt chunk of `requests` (each with
        `kv_dest`), or None to send after compute instead. Marks the requests `kv_push_started`."""
        return None

    def start_send(self, request) -> None:
        """`request` is computed and holds its first token: finish (or post) its push and notify."""
        raise TypeError(f"a {self.role} connector does not send KV")

    def abort_send(self, request) -> None:
        """Give up a push; `poll` still reports it once no WRITE from its pages is in flight."""

    def prepare_destination(self, dest: dict) -> None:
        """A request was admitted with its destination `dest`: prepare the way to that receiver now, off
        the engine loop, so that the request's first WRITE does not pay for it (NIXL: the connection to a
        peer not seen before). A destination that follows its request comes through `set_destination`."""

    def set_destination(self, request) -> None:
        """`request.kv_dest` has just become known (it was `DESTINATION_FOLLOWS`): write what is
        computed already, the rest as it comes."""
        raise TypeError(f"a {self.role} connector does not send KV")

    def abandon(self, dest: dict) -> None:
        """A destination came for a request that had already ended: tell the receiver to free it."""

    def owns_notice(self, request_id: str) -> bool:
        """A push of `request_id` to a known destination is under way: its own end tells the
        receiver (an "abandoned" notice before its WRITEs end would free pages still being written)."""
        return False

    # ------------------------------------------------------------- decode side
    def destination(self, request) -> dict:
        """Where a prefill engine must write `request`'s prompt KV (its `page_ids`)."""
        raise TypeError(f"a {self.role} connector does not receive KV")

    # ------------------------------------------------------------- both
    @abc.abstractmethod
    def poll(self) -> ConnectorEvents:
        """Progress transfers; what ended since the last call."""

    def busy(self) -> bool:
        """Transfers in flight (the engine loop keeps polling while true)."""
        return False

    def poll_interval_s(self) -> float:
        """How long the idle engine loop may wait before the next `poll` while `busy`: short while
        a push is in its tail (computed; its last WRITEs and the notice are all that TTFT waits for)."""
        return 0.001

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass
