"""Process plumbing every pdserve gRPC server shares: the standard health service and server
reflection next to the service itself, optional TLS (`--tls-cert/--tls-key/--tls-ca`: mutual TLS
between router and nodes, server-side TLS on the public endpoints), and a stop on SIGINT/SIGTERM
(no serving logic here)."""
from __future__ import annotations

import asyncio
import signal
import ssl
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one process: its certificate and key, and the cluster CA that signs every
    router's and node's certificate (peers are verified against it)."""

    cert: str
    key: str
    ca: str | None = None

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None, ca: str | None) -> "TLSFiles | None":
        if not (cert or key or ca):
            return None
        if not (cert and key):
            raise ValueError("--tls-cert and --tls-key go together (and --tls-ca names the cluster CA)")
        return cls(cert, key, ca)

    def argv(self) -> list[str]:
        return ["--tls-cert", self.cert, "--tls-key", self.key] + (["--tls-ca", self.ca] if self.ca else [])

    def _read(self, path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        """A node requires a client certificate signed by the CA (mutual TLS); the router's public
        endpoint does not (its clients authenticate with the API key)."""
        if require_client_cert and self.ca is None:
            raise ValueError("mutual TLS needs --tls-ca (the CA that signs the cluster's certificates)")
        return grpc.ssl_server_credentials([(self._read(self.key), self._read(self.cert))],
                                           root_certificates=self._read(self.ca) if require_client_cert else None,
                                           require_client_auth=require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The router's side towards nodes: verify them against the CA, present our certificate."""
        return grpc.ssl_channel_credentials(root_certificates=self._read(self.ca), private_key=self._read(self.key),
                                            certificate_chain=self._read(self.cert))

    def ssl_context(self) -> ssl.SSLContext:
        """Server-side TLS for an HTTP endpoint."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


# A node that is starting or restarting is reconnected to within a second: gRPC's default backoff
# grows to minutes, and at a cluster's start the router's first tries fail before the nodes listen.
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 1000)]


def open_channel(address: str, tls: TLSFiles | None = None) -> grpc.aio.Channel:
    if tls:
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=_CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)


class GrpcServer:
    def __init__(self, servicer, add_fn, service_name: str):
        self.service_name = service_name
        self.server = grpc.aio.server()
        add_fn(servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([service_name, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            self.server)

    async def start(self, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
        if credentials is not None:
            bound = self.server.add_secure_port(f"{host}:{port}", credentials)
        else:
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
