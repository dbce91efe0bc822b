"""The gRPC front of a prefill or decode node: one process serving the node API, the standard
health service and reflection, over an engine process (`EngineClient`; token ids only — the
router detokenizes). Aborts, client cancellations and a dead engine all end requests with a
clear status; SIGTERM shuts the engine down and leaves no process behind.

Both node kinds run `serve` with their role's servicer (prefill_node/, decode_node/).
"""
from __future__ import annotations

import asyncio
import logging
import socket

from node.core import Node
from node.grpc_server import GrpcServer, wait_for_signal
from node.metrics_http import serve_metrics

log = logging.getLogger(__name__)


async def serve(node: Node, servicer, add_fn, service_name: str, host: str, port: int) -> None:
    server = GrpcServer(servicer, add_fn, service_name)
    tls = node.options.tls
    bound = await server.start(host, port, tls.server_credentials(require_client_cert=True) if tls else None)
    log.info("%s node %s serving on %s:%d", node.role, node.node_id, host, bound)
    opts = node.options
    metrics_runner = None
    if opts.metrics_port is not None:
        metrics_runner, metrics_port = await serve_metrics(node, host, opts.metrics_port)
        print(f"{node.role} node metrics on http://{host}:{metrics_port}/metrics", flush=True)
    registration = heartbeat = None
    if opts.redis_url:
        from node.registration import NodeRegistration

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
