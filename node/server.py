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
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from deploy.grpc_server import GrpcServer, wait_for_signal
from engine.engine_client import EngineClient
from engine.metrics import EngineStatsCollector, ServingMetrics, SLOTargets, pdserve_version
from proto import convert
from proto import pdserve_pb2 as pb

log = logging.getLogger(__name__)

FRESH_STATS_S = 0.2  # how long a read waits for fresh engine stats before using the snapshot
STATS_REFRESH_S = 2.0  # background refresh of the snapshot (it may wait a whole engine step)


@dataclass
class NodeOptions:
    """Operations knobs of a node process (see `pdserve prefill --help`)."""

    metrics_port: int | None = None  # None: no HTTP /metrics; 0: any free port
    redis_url: str | None = None
    node_name: str | None = None
    advertise_host: str | None = None
    heartbeat_ttl_s: float = 3.0
    slo: str | None = None


class Node:
    """What both servicers share: the engine client, the node's identity, load and metrics."""

    def __init__(self, role: str, engine_config, model_name: str, options: NodeOptions | None = None):
        engine_config.kv_role = role
        self.options = options or NodeOptions()
        self.role = role
        self.model_name = model_name
        self.node_id = self.options.node_name or f"{role}-{uuid.uuid4().hex[:8]}"
        self.metrics = ServingMetrics(model_name, role, self.node_id, SLOTargets.parse(self.options.slo))
        self.client = EngineClient(engine_config, detokenize=False)
        self.incarnation = self.client.info.incarnation or uuid.uuid4().hex[:12]
        self.in_flight: set[str] = set()
        self.engine_died = False
        # Engine stats: read fresh when the engine answers within FRESH_STATS_S, else the last
        # snapshot, so `Info`, `/metrics` and `/health` never wait on a long engine step (a probe
        # that waits would call a busy node dead). A slow background refresh, which may wait as
        # long as a step takes, keeps the snapshot from ageing while the engine stays busy.
        self._stats: tuple[float, dict] = (time.monotonic(), self.client.engine_stats())
        threading.Thread(target=self._refresh_stats, daemon=True, name="engine-stats").start()
        self.metrics.registry.register(EngineStatsCollector(self.rank_stats, self.metrics.base))
        ep = engine_config.parallel
        backend = (self.rank_stats() or [{}])[0].get("ep_backend", "none")
        self.metrics.set("node_info", 1, version=pdserve_version(), ep_size=str(ep.ep_size), ep_backend=backend)

    def _refresh_stats(self) -> None:
        while not self.client._closed:
            time.sleep(STATS_REFRESH_S)
            self._read_stats(timeout_s=30.0)

    def _read_stats(self, timeout_s: float) -> None:
        try:
            self._stats = (time.monotonic(), self.client.engine_stats(timeout_s=timeout_s))
        except Exception:  # engine busy past the timeout, dead or shut down: keep the snapshot
            pass

    def stats(self, max_age_s: float = 30.0) -> dict | None:
        """The engine's stats, fresh if it answers at once; None when it has not answered for
        `max_age_s` (then the node exports no engine values and reports unhealthy)."""
        self._read_stats(timeout_s=FRESH_STATS_S)
        at, stats = self._stats
        return stats if time.monotonic() - at <= max_age_s else None

    def rank_stats(self) -> list | None:
        """Per-rank engine stats for the metrics collector (None: see `stats`)."""
        s = self.stats()
        return s["ranks"] if s is not None else None

    def info(self) -> pb.NodeInfo:
        """Identity, layout and load; free pages count prefix-cached pages (reclaimable) as free."""
        i = self.client.info
        self.stats()
        s = self._stats[1]  # the latest, however old: a node whose engine died exits (see serve)
        return pb.NodeInfo(role=self.role, node_id=self.node_id, incarnation=self.incarnation, model=self.model_name,
                           max_model_len=i.max_model_len, layout=convert.layout_to_proto(i.kv_layout),
                           num_pages=s.get("num_pages", i.num_pages), num_free_pages=s["num_free_or_cached_pages"],
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
    opts = node.options
    metrics_runner = None
    if opts.metrics_port is not None:
        metrics_runner, metrics_port = await _serve_metrics(node, host, opts.metrics_port)
        print(f"{node.role} node metrics on http://{host}:{metrics_port}/metrics", flush=True)
    registration = heartbeat = None
    if opts.redis_url:
        from router.redis_registry import NodeRegistration

        advertise = opts.advertise_host or (socket.gethostname() if host in ("0.0.0.0", "::") else host)
        registration = NodeRegistration(opts.redis_url, node.model_name, node.role, node.node_id,
                                        f"{advertise}:{bound}", node.info, opts.heartbeat_ttl_s)
        await registration.beat()  # registered before we say ready
        heartbeat = asyncio.create_task(registration.run())
    print(f"{node.role} node ready on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    watchdog = asyncio.create_task(_watch_engine(node, stop))
    await wait_for_signal(stop)
    watchdog.cancel()
    if heartbeat is not None:
        heartbeat.cancel()
        await registration.close()
    await server.stop()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    node.client.shutdown()


async def _watch_engine(node: Node, stop: asyncio.Event) -> None:
    """A node whose engine process (or any EP rank) died cannot serve: stop, so the process exits
    non-zero and whoever runs it (pdserve up, Ray, Kubernetes) sees it and may restart it; routers
    see the refused connection and route around it at once."""
    while not stop.is_set():
        dead = node.client.dead_process()
        if dead is not None:
            log.error("%s node %s: engine process %s exited (code %s); shutting the node down", node.role,
                      node.node_id, dead.name, dead.exitcode)
            node.engine_died = True
            stop.set()
            return
        await asyncio.sleep(0.5)


async def _serve_metrics(node: Node, host: str, port: int):
    """HTTP `/metrics` (Prometheus text) and `/health` (200 while the engine answers)."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    loop = asyncio.get_running_loop()

    async def metrics(request):
        body = await loop.run_in_executor(None, generate_latest, node.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(request):
        ok = await loop.run_in_executor(None, node.rank_stats) is not None
        return web.json_response({"status": "ok" if ok else "engine not answering", "node": node.node_id},
                                 status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


class NodeServicerBase:
    """`Info` and `Abort`, the same on both node kinds."""

    node: Node

    async def Info(self, request, context):
        return await asyncio.get_running_loop().run_in_executor(None, self.node.info)

    async def Abort(self, request, context):
        return pb.AbortResponse(found=self.node.abort(request.request_id))
