"""Helpers for router tests whose nodes are scripted gRPC servicers (no engine), so the order of
events is fixed: a real gRPC server on a loopback port for each, and the router between them."""
from __future__ import annotations

import grpc


async def serve(servicer, add_fn) -> tuple[grpc.aio.Server, str]:
    """Start `servicer` (added by its generated `add_*_to_server`) on a free loopback port."""
    server = grpc.aio.server()
    add_fn(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"
