"""A node's HTTP endpoint: `/metrics` (Prometheus text) and `/health` (200 while the engine
answers, 503 when its stats have gone stale)."""
from __future__ import annotations

import asyncio


async def serve_metrics(node, host: str, port: int):
    """Start the endpoint for `node` (a `node.core.Node`); returns (aiohttp runner, bound port)."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    loop = asyncio.get_running_loop()

    async def metrics(request):
        body = await loop.run_in_executor(None, generate_latest, node.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(request):
        ok = await loop.run_in_executor(None, node.engine_stats.ranks) is not None
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
