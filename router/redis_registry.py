"""The cluster registry in Redis: nodes announce themselves with expiring heartbeats, routers
discover nodes (and their load) from it and share prefix-cache summaries through it.

Keys, all under `pdserve:{model}:` so clusters serving different models can share one Redis:
* `node:{node_id}` — hash {address, role, info (serialized `NodeInfo`: layout, load, pages)},
  rewritten every heartbeat with a TTL; a node that stops heartbeating disappears by itself.
* `prefix:{node_id}` — sorted set of 16-token prefix hashes a router sent to that prefill node
  (score: last use time), trimmed to a bound; every router reads them for prefix-aware routing,
  so a prefix warmed by one router is found by the others.

The node side (writer, `node.registration.NodeRegistration`) owns the key schema; this module is
the router side (reader), `RedisRegistry`, a drop-in for the embedded `Registry`. Neither touches
tensors or serving logic.
"""
from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis

from node.grpc_server import open_channel
from node.registration import redis_key
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from router.registry import NodeHandle, NoNodeAvailable, PrefixIndex, Registry, prefix_hashes

log = logging.getLogger(__name__)

PREFIX_CAPACITY = 50_000  # hashes kept per prefill node


class RedisRegistry(Registry):
    def __init__(self, url: str, model: str, refresh_s: float = 0.5, tls=None):
        super().__init__([], [], tls)
        self.redis = aioredis.from_url(url)
        self.model = model
        self.refresh_s = refresh_s
        self.by_id: dict[str, NodeHandle] = {}
        self._suspect_until: dict[str, float] = {}
        self.need_prefill = True  # False for a collocated cluster (decode nodes only)
        self._draining: list[NodeHandle] = []  # dropped nodes with requests still on them

    async def refresh(self) -> None:
        pattern = redis_key(self.model, "node", "*")
        keys = [k async for k in self.redis.scan_iter(match=pattern, count=1000)]
        async with self.redis.pipeline(transaction=False) as p:
            for k in keys:
                p.hgetall(k)
            entries = await p.execute()
        seen = set()
        now = time.monotonic()
        for entry in entries:
            if not entry or b"info" not in entry:
                continue  # expired between SCAN and HGETALL
            info = pb.NodeInfo.FromString(entry[b"info"])
            address, role = entry[b"address"].decode(), entry[b"role"].decode()
            seen.add(info.node_id)
            node = self.by_id.get(info.node_id)
            if node is not None and node.address != address:
                await self._drop(info.node_id)
                node = None
            if node is None:
                stub_cls = pb_grpc.PrefillNodeStub if role == "prefill" else pb_grpc.DecodeNodeStub
                channel = open_channel(address, self.tls)
                node = NodeHandle(role, address, channel, stub_cls(channel))
                node.node_id = info.node_id
                self.by_id[info.node_id] = node
                self.nodes.append(node)
                log.info("registry: %s node %s at %s joined", role, info.node_id, address)
            elif node.info is not None and node.info.incarnation != info.incarnation:
                log.warning("registry: %s node %s restarted (incarnation %s -> %s)", role, info.node_id,
                            node.info.incarnation, info.incarnation)
                self._suspect_until.pop(info.node_id, None)
            node.info = info
            node.alive = now >= self._suspect_until.get(info.node_id, 0.0)
        for node_id in [n for n in self.by_id if n not in seen]:
            log.warning("registry: node %s left (its heartbeat expired)", node_id)
            await self._drop(node_id)
        await self._close_drained()

    async def _drop(self, node_id: str) -> None:
        """No new requests go to the node. Its channel closes once the requests this router has
        on it are over: a node whose heartbeat is only late (a busy host) finishes them, and a
        dead one fails them with its own errors — closing the channel under them would cancel
        requests that could still succeed."""
        node = self.by_id.pop(node_id, None)
        self._suspect_until.pop(node_id, None)
        if node is not None:
            node.alive = False
            self.nodes.remove(node)
            self._draining.append(node)
        await self._close_drained()

    async def _close_drained(self) -> None:
        idle = [n for n in self._draining if n.in_flight == 0]
        self._draining = [n for n in self._draining if n.in_flight > 0]
        for node in idle:
            await node.channel.close()

    def mark_dead(self, node: NodeHandle) -> None:
        # Do not route to it again until its registration expires or shows a new incarnation.
        node.alive = False
        self._suspect_until[getattr(node, "node_id", node.address)] = time.monotonic() + 30.0

    async def run(self, interval_s: float | None = None) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:  # Redis briefly unreachable: keep the last view, retry
                log.warning("registry refresh from Redis failed: %s", e)
            await asyncio.sleep(interval_s or self.refresh_s)

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            try:
                await self.refresh()
            except Exception as e:
                log.warning("waiting for Redis: %s", e)
            if (self.of("prefill") or not self.need_prefill) and self.of("decode"):
                return
            await asyncio.sleep(0.5)
        raise NoNodeAvailable(f"no prefill and decode nodes registered in Redis for model {self.model!r} "
                              f"within {timeout_s:.0f} s")

    # ------------------------------------------------------------- shared prefix summaries
    async def prefix_matches(self, ids: list[int]) -> dict[NodeHandle, int]:
        """Tokens of `ids`' longest prefix that any router sent to each live prefill node."""
        hashes = list(prefix_hashes(ids))
        nodes = self.of("prefill")
        if not hashes or not nodes:
            return {}
        async with self.redis.pipeline(transaction=False) as p:
            for n in nodes:
                p.zmscore(redis_key(self.model, "prefix", n.node_id), [str(h) for h in hashes])
            scores = await p.execute()
        out = {}
        for node, sc in zip(nodes, scores):
            k = 0
            while k < len(sc) and sc[k] is not None:
                k += 1
            out[node] = k * PrefixIndex.BLOCK
        return out

    async def record_prefix(self, node: NodeHandle, ids: list[int]) -> None:
        hashes = list(prefix_hashes(ids))
        if not hashes:
            return
        key = redis_key(self.model, "prefix", node.node_id)
        now = time.time()
        try:
            async with self.redis.pipeline(transaction=False) as p:
                p.zadd(key, {str(h): now for h in hashes})
                p.zremrangebyrank(key, 0, -PREFIX_CAPACITY - 1)
                p.expire(key, 3600)
                await p.execute()
        except Exception as e:
            log.warning("recording a prefix in Redis failed: %s", e)

    async def close(self) -> None:
        for node in list(self.by_id.values()) + self._draining:
            await node.channel.close()
        self.by_id.clear()
        self._draining.clear()
        await self.redis.aclose()
