"""The router process: the public gRPC `Generate` service (with health and reflection) and the
OpenAI-compatible HTTP API, over the node registry."""
from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import pdserve_pb2_grpc as pb_grpc
from router.core import Router, Timeouts
from router.grpc_api import GenerateServicer
from router.http_api import HttpApi
from router.registry import Registry

log = logging.getLogger(__name__)


async def serve(prefill: list[str], decode: list[str], tokenizer, model_name: str, host: str, grpc_port: int,
                http_port: int, policy: str = "least_load", timeouts: Timeouts | None = None) -> None:
    registry = Registry(prefill, decode)
    await registry.wait_ready()
    router = Router(registry, tokenizer, model_name, policy, timeouts)
    probe = asyncio.create_task(registry.run())
    server = grpc.aio.server()
    pb_grpc.add_GenerateServicer_to_server(GenerateServicer(router), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(["pdserve.v1.Generate", health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{grpc_port}")
    await server.start()
    for name in ("", "pdserve.v1.Generate"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    runner = web.AppRunner(HttpApi(router).app())
    await runner.setup()
    site = web.TCPSite(runner, host, http_port)
    await site.start()
    http_bound = site._server.sockets[0].getsockname()[1]
    print(f"router ready: grpc {host}:{bound} http http://{host}:{http_bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    probe.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2)
    await runner.cleanup()


def main(prefill, decode, tokenizer_path, model_name, host, grpc_port, http_port, policy) -> None:
    from engine.tokenizer import load_tokenizer

    asyncio.run(serve(prefill, decode, load_tokenizer(tokenizer_path), model_name, host, grpc_port, http_port,
                      policy))
