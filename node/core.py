"""What both node roles share: the engine client (token ids only — the router detokenizes), the
node's identity and incarnation, its load (`Info`), aborts and its serving metrics."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

from engine.engine_client import EngineClient
from engine.metrics import EngineStatsCollector, ServingMetrics, SLOTargets, pdserve_version
from node.engine_stats import EngineStats
from proto import convert
from proto import pdserve_pb2 as pb


@dataclass
class NodeOptions:
    """Operations knobs of a node process (see `pdserve prefill --help`)."""

    metrics_port: int | None = None  # None: no HTTP /metrics; 0: any free port
    redis_url: str | None = None
    node_name: str | None = None
    advertise_host: str | None = None
    heartbeat_ttl_s: float = 3.0
    slo: str | None = None
    tls: object | None = None  # node.grpc_server.TLSFiles: serve gRPC with mutual TLS (CA-signed clients only)


class Node:
    """What both servicers share: the engine client, the node's identity, load and metrics."""

    def __init__(self, role: str, engine_config, model_name: str, options: NodeOptions | None = None):
        engine_config = replace(engine_config, kv_role=role)  # the engine of a node hands KV over in its role
        self.max_num_seqs = engine_config.scheduler.max_num_seqs
        self.options = options or NodeOptions()
        self.role = role
        self.model_name = model_name
        self.node_id = self.options.node_name or f"{role}-{uuid.uuid4().hex[:8]}"
        self.metrics = ServingMetrics(model_name, role, self.node_id, SLOTargets.parse(self.options.slo))
        self.client = EngineClient(engine_config, detokenize=False)
        self.incarnation = self.client.info.incarnation or uuid.uuid4().hex[:12]
        self.in_flight: set[str] = set()
        self.engine_died = False
        self.engine_stats = EngineStats(self.client)
        self.metrics.registry.register(EngineStatsCollector(self.engine_stats.ranks, self.metrics.base))
        ep = engine_config.parallel
        backend = (self.engine_stats.ranks() or [{}])[0].get("ep_backend", "none")
        self.metrics.set("node_info", 1, version=pdserve_version(), ep_size=str(ep.ep_size), ep_backend=backend)

    def info(self) -> pb.NodeInfo:
        """Identity, layout and load; free pages count prefix-cached pages (reclaimable) as free."""
        i = self.client.info
        self.engine_stats.get()
        s = self.engine_stats.latest  # however old: a node whose engine died exits (see node.server)
        return pb.NodeInfo(role=self.role, node_id=self.node_id, incarnation=self.incarnation, model=self.model_name,
                           max_model_len=i.max_model_len, layout=convert.layout_to_proto(i.kv_layout),
                           num_pages=s.get("num_pages", i.num_pages), num_free_pages=s["num_free_or_cached_pages"],
                           num_running=s["num_running"], num_waiting=s["num_waiting"],
                           prefix_cache_queries_tokens=s["prefix_cache_queries_tokens"],
                           prefix_cache_hits_tokens=s["prefix_cache_hits_tokens"], max_num_seqs=self.max_num_seqs)

    def abort(self, request_id: str, index: int | None = None) -> bool:
        """Abort a request (or only choice `index` of an n > 1 request)."""
        found = request_id in self.in_flight
        self.client.abort(request_id, index=index)
        return found
