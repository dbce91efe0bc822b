"""A node's view of its engine's stats (load, pages, prefix cache, per-rank values): read fresh
when the engine answers within `FRESH_STATS_S`, else the last snapshot, so `Info`, `/metrics` and
`/health` never wait on a long engine step (a probe that waits would call a busy node dead). A slow
background refresh, which may wait as long as a step takes, keeps the snapshot from ageing while
the engine stays busy."""
from __future__ import annotations

import threading
import time

FRESH_STATS_S = 0.2  # how long a read waits for fresh engine stats before using the snapshot
STATS_REFRESH_S = 2.0  # background refresh of the snapshot (it may wait a whole engine step)


class EngineStats:
    def __init__(self, client):
        self.client = client
        self._stats: tuple[float, dict] = (time.monotonic(), client.engine_stats())
        threading.Thread(target=self._refresh, daemon=True, name="engine-stats").start()

    def _refresh(self) -> None:
        while not self.client._closed:
            time.sleep(STATS_REFRESH_S)
            self._read(timeout_s=30.0)

    def _read(self, timeout_s: float) -> None:
        try:
            self._stats = (time.monotonic(), self.client.engine_stats(timeout_s=timeout_s))
        except Exception:  # engine busy past the timeout, dead or shut down: keep the snapshot
            pass

    def get(self, max_age_s: float = 30.0) -> dict | None:
        """The engine's stats, fresh if it answers at once; None when it has not answered for
        `max_age_s` (then the node exports no engine values and reports unhealthy)."""
        self._read(timeout_s=FRESH_STATS_S)
        at, stats = self._stats
        return stats if time.monotonic() - at <= max_age_s else None

    def ranks(self) -> list | None:
        """Per-rank engine stats for the metrics collector (None: see `get`)."""
        s = self.get()
        return s["ranks"] if s is not None else None

    @property
    def latest(self) -> dict:
        """The last stats read, however old."""
        return self._stats[1]
