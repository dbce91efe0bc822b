"""The router process: the public gRPC `Generate` service (with health and reflection) and the
OpenAI-compatible HTTP API, over the node registry."""
from __future__ import annotations

import asyncio
import logging
import uuid

from aiohttp import web

from node.grpc_server import GrpcServer, TLSFiles, wait_for_signal
from engine.metrics import ServingMetrics, SLOTargets, pdserve_version
from proto import pdserve_pb2_grpc as pb_grpc
from router.chat_template import ChatTemplate
from router.core import Router, Timeouts
from router.grpc_api import GenerateServicer
from router.http_api import HttpApi
from router.registry import Registry

log = logging.getLogger(__name__)


async def serve(prefill: list[str], decode: list[str], tokenizer, model_name: str, host: str, grpc_port: int,
                http_port: int, policy: str = "least_load", timeouts: Timeouts | None = None,
                redis_url: str | None = None, slo: str | None = None, name: str | None = None,
                collocated: bool = False, chat_template: ChatTemplate | None = None, api_key: str | None = None,
                tls: TLSFiles | None = None) -> None:
    if redis_url:
        from router.redis_registry import RedisRegistry

        registry = RedisRegistry(redis_url, model_name, tls=tls)
        registry.need_prefill = not collocated
    else:
        registry = Registry(prefill, decode, tls)
    await registry.wait_ready()
    metrics = ServingMetrics(model_name, "router", name or f"router-{uuid.uuid4().hex[:8]}", SLOTargets.parse(slo))
    metrics.set("node_info", 1, version=pdserve_version(), ep_size="", ep_backend="")
    router = Router(registry, tokenizer, model_name, policy, timeouts, metrics=metrics, collocated=collocated)
    probe = asyncio.create_task(registry.run())
    server = GrpcServer(GenerateServicer(router, api_key), pb_grpc.add_GenerateServicer_to_server,
                        "pdserve.v1.Generate")
    bound = await server.start(host, grpc_port, tls.server_credentials(require_client_cert=False) if tls else None)
    api = HttpApi(router, chat_template, api_key)
    runner = web.AppRunner(api.app())
    await runner.setup()
    site = web.TCPSite(runner, host, http_port, ssl_context=tls.ssl_context() if tls else None)
    await site.start()
    http_bound = site._server.sockets[0].getsockname()[1]
    scheme = "https" if tls else "http"
    await api.grammar_compiler_ready()
    print(f"router ready: grpc {host}:{bound} http {scheme}://{host}:{http_bound}", flush=True)
    await wait_for_signal()
    probe.cancel()
    await server.stop()
    await runner.cleanup()
    await registry.close()


def main(prefill, decode, tokenizer_path, model_name, host, grpc_port, http_port, policy, redis_url=None, slo=None,
         name=None, collocated=False, chat_template_file=None, api_key=None, tls=None) -> None:
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    chat_template = ChatTemplate.load(tokenizer.directory, chat_template_file)
    log.info("chat template: %s", chat_template.origin)
    asyncio.run(serve(prefill, decode, tokenizer, model_name, host, grpc_port, http_port,
                      policy, redis_url=redis_url, slo=slo, name=name, collocated=collocated,
                      chat_template=chat_template, api_key=api_key, tls=tls))
