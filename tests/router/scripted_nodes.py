"""Helpers for router tests whose nodes are scripted gRPC servicers (no engine), so the order of
events is fixed: a real gRPC server on a loopback port for each, and the real router between them."""
from __future__ import annotations

import asyncio
import contextlib

import grpc

from proto import pdserve_pb2_grpc as pb_grpc
from router.core import Router, Timeouts
from router.registry import Registry


async def serve(servicer, add_fn) -> tuple[grpc.aio.Server, str]:
    """Start `servicer` (added by its generated `add_*_to_server`) on a free loopback port."""
    server = grpc.aio.server()
    add_fn(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def scripted_cluster(prefill, decode, reserve_s: float = 10.0):
    """One scripted prefill and one scripted decode servicer on loopback, and a router over them."""
    d_server, d_addr = await serve(decode, pb_grpc.add_DecodeNodeServicer_to_server)
    p_server, p_addr = await serve(prefill, pb_grpc.add_PrefillNodeServicer_to_server)
    registry = Registry([p_addr], [d_addr])
    try:
        await asyncio.wait_for(registry.wait_ready(), 20)
        yield Router(registry, tokenizer=None, model_name="m", timeouts=Timeouts(reserve_s=reserve_s))
    finally:
        await registry.close()
        await d_server.stop(0)
        await p_server.stop(0)
