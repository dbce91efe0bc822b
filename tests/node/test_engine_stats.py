"""A node's engine stats: fresh when the engine answers in time, the last snapshot when it is
busy, and none once the snapshot is older than the caller accepts (a fake engine client)."""
from __future__ import annotations

import time

from node.engine_stats import FRESH_STATS_S, EngineStats
from node.registration import redis_key


class FakeClient:
    def __init__(self):
        self._closed = False
        self.busy = False
        self.n = 0

    def engine_stats(self, timeout_s: float = 30.0) -> dict:
        if self.busy:
            time.sleep(min(timeout_s, FRESH_STATS_S))
            raise TimeoutError("engine busy")
        self.n += 1
        return {"n": self.n, "ranks": [{"rank": 0, "n": self.n}]}


def test_fresh_then_snapshot_then_stale():
    client = FakeClient()
    stats = EngineStats(client)
    try:
        assert stats.get()["n"] == 2  # a read asks the engine again (1 was the start-up read)
        assert stats.ranks() == [{"rank": 0, "n": 3}]
        client.busy = True
        assert stats.get()["n"] == 3 and stats.latest["n"] == 3  # busy: the snapshot
        assert stats.get(max_age_s=0.0) is None and stats.ranks() is not None
    finally:
        client._closed = True


def test_redis_key_schema_is_shared_by_nodes_and_routers():
    assert redis_key("m", "node", "d0") == "pdserve:m:node:d0"
    assert redis_key("m", "node", "*") == "pdserve:m:node:*"
