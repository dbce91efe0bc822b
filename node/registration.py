"""A node's registration in the cluster registry in Redis: its identity, address and load
(`NodeInfo`) rewritten every heartbeat with a TTL, so a node that stops heartbeating disappears by
itself. The key schema is defined here and read by the router (`router/redis_registry.py`):

* `pdserve:{model}:node:{node_id}` — hash {address, role, info (serialized `NodeInfo`)};
* `pdserve:{model}:prefix:{node_id}` — the routers' prefix summaries of a prefill node.
"""
from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from proto import pdserve_pb2 as pb

log = logging.getLogger(__name__)


def redis_key(model: str, kind: str, node_id: str = "") -> str:
    return f"pdserve:{model}:{kind}:{node_id}"


class NodeRegistration:
    """Heartbeats one node's identity and load into Redis until stopped; deletes it on stop."""

    def __init__(self, url: str, model: str, role: str, node_id: str, address: str, info_fn, ttl_s: float = 3.0):
        if ttl_s <= 0:
            raise ValueError(f"heartbeat TTL must be positive, got {ttl_s}")
        self.redis = aioredis.from_url(url)
        self.model, self.role, self.node_id, self.address = model, role, node_id, address
        self.info_fn, self.ttl_s = info_fn, ttl_s
        self.key = redis_key(model, "node", node_id)

    async def beat(self) -> None:
        info: pb.NodeInfo = await asyncio.get_running_loop().run_in_executor(None, self.info_fn)
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(self.key, mapping={"address": self.address, "role": self.role, "info": info.SerializeToString()})
            p.pexpire(self.key, int(self.ttl_s * 1000))
            await p.execute()

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception as e:  # Redis down or the engine busy: keep trying; the TTL tells routers
                log.warning("heartbeat of %s to Redis failed: %s", self.node_id, e)
            await asyncio.sleep(self.ttl_s / 3)

    async def close(self) -> None:
        try:
            await self.redis.delete(self.key)
        except Exception:
            pass
        await self.redis.aclose()
