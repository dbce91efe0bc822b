"""The gRPC front of a prefill or decode node: one process serving the node API, the standard
health service and reflection, over an engine process (`EngineClient`; token ids only — the
router detokenizes). Aborts, client cancellations and a dead engine all end requests with a
clear status; SIGTERM shuts the engine down and leaves no process behind.

Lives in deploy/ because both node kinds share it; the role-specific servicers are in
prefill_node/ and decode_node/.
"""
from __future__ import annotations

import asyncio
import logging
import uuid

from deploy.grpc_server import GrpcServer, wait_for_signal
from engine.engine_client import EngineClient
from proto import convert
from proto import pdserve_pb2 as pb

log = logging.getLogger(__name__)


class Node:
    """What both servicers share: the engine client and the node's identity and load."""

    def __init__(self, role: str, engine_config, model_name: str):
        engine_config.kv_role = role
        self.role = role
        self.model_name = model_name
        self.node_id = f"{role}-{uuid.uuid4().hex[:8]}"
        self.client = EngineClient(engine_config, detokenize=False)
        self.incarnation = self.client.info.incarnation or uuid.uuid4().hex[:12]
        self.in_flight: set[str] = set()

    def info(self) -> pb.NodeInfo:
        """Identity, layout and load; free pages count prefix-cached pages (reclaimable) as free."""
        i = self.client.info
        s = self.client.engine_stats()
        return pb.NodeInfo(role=self.role, node_id=self.node_id, incarnation=self.incarnation, model=self.model_name,
                           max_model_len=i.max_model_len, layout=convert.layout_to_proto(i.kv_layout),
                           num_pages=i.num_pages, num_free_pages=s["num_free_or_cached_pages"],
                           num_running=s["num_running"], num_waiting=s["num_waiting"],
                           prefix_cache_queries_tokens=s["prefix_cache_queries_tokens"],
                           prefix_cache_hits_tokens=s["prefix_cache_hits_tokens"])

    def abort(self, request_id: str) -> bool:
        found = request_id in self.in_flight
        self.client.abort(request_id)
        return found


def delta_to_proto(rid: str, delta) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=rid, token_ids=list(delta.token_ids), finished=delta.finished,
                              logprobs=convert.logprobs_to_proto(delta.logprobs))
    if delta.finished:
        msg.finish_reason = delta.finish_reason or ""
        msg.stop_reason = "" if delta.stop_reason is None else str(delta.stop_reason)
        msg.error = delta.error or ""
    return msg


async def serve(node: Node, servicer, add_fn, service_name: str, host: str, port: int) -> None:
    server = GrpcServer(servicer, add_fn, service_name)
    bound = await server.start(host, port)
    log.info("%s node %s serving on %s:%d", node.role, node.node_id, host, bound)
    print(f"{node.role} node ready on {host}:{bound}", flush=True)
    await wait_for_signal()
    await server.stop()
    node.client.shutdown()


class NodeServicerBase:
    """`Info` and `Abort`, the same on both node kinds."""

    node: Node

    async def Info(self, request, context):
        return await asyncio.get_running_loop().run_in_executor(None, self.node.info)

    async def Abort(self, request, context):
        return pb.AbortResponse(found=self.node.abort(request.request_id))
