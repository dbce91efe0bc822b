"""Process plumbing every pdserve gRPC server shares: the standard health service and server
reflection next to the service itself, and a stop on SIGINT/SIGTERM (no serving logic here)."""
from __future__ import annotations

import asyncio
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


class GrpcServer:
    def __init__(self, servicer, add_fn, service_name: str):
        self.service_name = service_name
        self.server = grpc.aio.server()
        add_fn(servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([service_name, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            self.server)

    async def start(self, host: str, port: int) -> int:
        bound = self.server.add_insecure_port(f"{host}:{port}")
        await self.server.start()
        for name in ("", self.service_name):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return bound

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=2)


async def wait_for_signal(stop: asyncio.Event | None = None) -> None:
    """Until SIGINT/SIGTERM, or until `stop` is set by the caller (e.g. its engine died)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
