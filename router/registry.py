"""The router's view of the cluster: which prefill and decode nodes exist, whether they answer,
their load, and the routing policies that pick one. The embedded registry holds a static list of
node addresses and probes each node's `Info` every second; a node that stops answering leaves
the pool until it answers again, and a new incarnation (a restarted node) is logged and used as
new. `router/redis_registry.py` replaces the static list with nodes discovered in Redis, under the
same policies.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

import grpc

from node.grpc_server import TLSFiles, open_channel
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
# Re-exported: the policies and prefix index live in router/policy.py (pure, shared with planner/).
from router.policy import POLICIES, PREFIX_BLOCK, NoNodeAvailable, PrefixIndex, pick_node, prefix_hashes  # noqa: F401

log = logging.getLogger(__name__)

@dataclass(eq=False)
class NodeHandle:
    role: str
    address: str
    channel: grpc.aio.Channel = field(repr=False)
    stub: object = field(repr=False)
    info: pb.NodeInfo | None = None
    alive: bool = False
    in_flight: int = 0  # requests this router has on the node now
    served: int = 0
    prefixes: PrefixIndex = field(default_factory=PrefixIndex, repr=False)
    node_id: str = ""  # the node's registered name (Redis registry); the address otherwise
    missed: int = 0  # Info probes in a row that timed out

    @property
    def load(self) -> int:
        return self.in_flight + (self.info.num_running if self.info else 0)


class Registry:
    def __init__(self, prefill_addrs: list[str], decode_addrs: list[str], tls: TLSFiles | None = None):
        self.tls = tls  # mutual TLS towards the nodes when set
        self.nodes: list[NodeHandle] = []
        for role, addrs, stub in (("prefill", prefill_addrs, pb_grpc.PrefillNodeStub),
                                  ("decode", decode_addrs, pb_grpc.DecodeNodeStub)):
            for a in addrs:
                ch = open_channel(a, self.tls)
                self.nodes.append(NodeHandle(role, a, ch, stub(ch)))
        self._rr = {"prefill": itertools.count(), "decode": itertools.count()}

    def of(self, role: str, alive_only: bool = True) -> list[NodeHandle]:
        return [n for n in self.nodes if n.role == role and (n.alive or not alive_only)]

    async def refresh(self) -> None:
        await asyncio.gather(*(self._probe(n) for n in self.nodes))

    async def _probe(self, node: NodeHandle) -> None:
        try:
            info = await node.stub.Info(pb.InfoRequest(), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            # Refused connection: gone now. A slow answer: dead only after several in a row.
            node.missed += 1
            if e.code() == grpc.StatusCode.UNAVAILABLE or node.missed >= 3:
                if node.alive:
                    log.warning("%s node %s stopped answering (%s)", node.role, node.address, e.code().name)
                node.alive = False
            return
        node.missed = 0
        if node.info is not None and info.incarnation != node.info.incarnation:
            log.warning("%s node %s restarted (incarnation %s -> %s)", node.role, node.address,
                        node.info.incarnation, info.incarnation)
        node.info, node.alive = info, True

    def mark_dead(self, node: NodeHandle) -> None:
        node.alive = False

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(interval_s)

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            await self.refresh()
            if all(n.alive for n in self.nodes):
                return
            await asyncio.sleep(0.5)
        dead = [n.address for n in self.nodes if not n.alive]
        raise NoNodeAvailable(f"nodes not ready within {timeout_s:.0f} s: {', '.join(dead)}")

    async def prefix_matches(self, ids: list[int]) -> dict[NodeHandle, int]:
        """Prefix tokens other routers sent to each prefill node (none here: one router)."""
        return {}

    async def record_prefix(self, node: NodeHandle, ids: list[int]) -> None:
        """Share that `ids` went to `node` with other routers (nothing to share here)."""

    async def close(self) -> None:
        for n in self.nodes:
            await n.channel.close()

    def pick(self, role: str, policy: str = "least_load", prompt_ids: list[int] | None = None,
             exclude: set | None = None, remote: dict | None = None) -> NodeHandle:
        nodes = [n for n in self.of(role) if not exclude or n not in exclude]
        if not nodes:
            raise NoNodeAvailable(f"no live {role} node")
        return pick_node(nodes, policy, self._rr[role], prompt_ids, remote)
