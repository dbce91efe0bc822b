"""OpenAI-compatible HTTP API of the router (aiohttp): `/v1/completions` (one prompt or a batch),
`/v1/chat/completions` (the checkpoint's chat template, see `chat_template.py`), both with logprobs,
`n` choices per prompt (one router request per prompt; chunks carry each choice's `index`) and SSE
streaming ending in `data: [DONE]`; `/v1/models`, `/health`, `/metrics`. With an API key
every route but `/health` and `/metrics` needs `Authorization: Bearer KEY` (401 otherwise, before
any parsing). Invalid requests get HTTP 400 with an OpenAI-style error body; a client that
disconnects aborts its requests."""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
from concurrent import futures

from aiohttp import web

from engine.structured_output import StructuredOutputError, StructuredOutputSpec, compiler_future, prewarm_enabled
from router.chat_template import ChatTemplate, ChatTemplateError
from router.core import BadRequest, Router
from router.openai_format import Choice, ResponseBuilder, completion_prompts, sampling_params


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def key_matches(authorization: str | None, api_key: str) -> bool:
    """`Authorization: Bearer KEY` against the router's key, in constant time."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class HttpApi:
    OPEN_PATHS = ("/health", "/metrics")  # probes and scrapers carry no key

    def __init__(self, router: Router, chat_template: ChatTemplate | None = None, api_key: str | None = None):
        self.router = router
        self.api_key = api_key
        self._grammar = None  # Future of structured output's compiler (started with the app: ~1 s in the background)
        self.chat_template = chat_template or ChatTemplate.load(getattr(router.tokenizer, "directory", None))
        self.started = int(time.time())

    def _start_grammar_compiler(self):
        tok = self.router.tokenizer
        eos = [tok.eos_token_id] if getattr(tok, "eos_token_id", None) is not None else None
        return compiler_future(getattr(tok, "directory", None), getattr(tok, "vocab_size", None), eos)

    async def grammar_compiler_ready(self, timeout_s: float = 120.0) -> None:
        """Wait for the compiler `app` started (the router does, before it reports ready: its ~1 s holding the
        GIL would otherwise stall the first requests). A failed build is not an error here (`futures.wait`
        does not raise it): constrained requests report it."""
        if self._grammar is not None:
            await asyncio.to_thread(futures.wait, [self._grammar], timeout_s)

    def app(self) -> web.Application:
        if self._grammar is None and prewarm_enabled():
            self._grammar = self._start_grammar_compiler()
        app = web.Application(client_max_size=32 << 20, middlewares=[self._authorize] if self.api_key else [])
        app.router.add_post("/v1/completions", lambda r: self._handle(r, chat=False))
        app.router.add_post("/v1/chat/completions", lambda r: self._handle(r, chat=True))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    @web.middleware
    async def _authorize(self, request: web.Request, handler):
        if request.path not in self.OPEN_PATHS and not key_matches(request.headers.get("Authorization"), self.api_key):
            return _error(401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error")
        return await handler(request)

    async def _models(self, request):
        return web.json_response({"object": "list", "data": [
            {"id": self.router.model_name, "object": "model", "created": self.started, "owned_by": "pdserve"}]})

    async def _health(self, request):
        reg = self.router.registry
        ok = (self.router.collocated or bool(reg.of("prefill"))) and bool(reg.of("decode"))
        return web.json_response({"status": "ok" if ok else "degraded",
                                  "prefill": len(reg.of("prefill")), "decode": len(reg.of("decode"))},
                                 status=200 if ok else 503)

    async def _metrics(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        r = self.router
        m = r.metrics
        if m is None:
            return web.Response(status=404, text="metrics are off\n")
        m.set("router_requests_in_flight", len(r.tasks))
        for role in ("prefill", "decode"):
            nodes = r.registry.of(role, alive_only=False)
            alive = sum(1 for n in nodes if n.alive)
            m.set("router_nodes", alive, node_role=role, state="alive")
            m.set("router_nodes", len(nodes) - alive, node_role=role, state="dead")
        body = generate_latest(m.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ------------------------------------------------------------- requests
    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except json.JSONDecodeError as e:
            raise BadRequest(f"invalid JSON body: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("invalid JSON body: the body must be a JSON object")
        return body

    def _chat_ids(self, body: dict) -> list[int]:
        template = self.chat_template
        return template.encode(self.router.tokenizer, body.get("messages"), tools=body.get("tools"),
                               documents=body.get("documents"),
                               add_generation_prompt=body.get("add_generation_prompt", True),
                               continue_final_message=bool(body.get("continue_final_message", False)),
                               chat_template_kwargs=body.get("chat_template_kwargs"))

    async def _check_constraint(self, spec: StructuredOutputSpec) -> None:
        """Compile the constraint against the served tokenizer (StructuredOutputError: a 400)."""
        if self._grammar is None:
            self._grammar = self._start_grammar_compiler()
        grammar = self._grammar  # waited on in a thread: a cancelled request must not cancel the shared future
        await asyncio.to_thread(lambda: grammar.result().validate(spec))

    async def _handle(self, request: web.Request, chat: bool):
        r = self.router
        try:
            body = await self._body(request)
            if body.get("model") and body["model"] != r.model_name:
                return _error(404, f"unknown model {body['model']!r}; serving {r.model_name!r}", "not_found_error")
            params = sampling_params(body, chat)
            constraint = StructuredOutputSpec.from_request(body)
            if constraint is not None:  # a bad one is a 400 here, before any engine work
                await self._check_constraint(constraint)
                params = dataclasses.replace(params, structured_output=(constraint.kind, constraint.value))
            if chat:
                prompts = [(None, r.prepare(None, self._chat_ids(body), params))]
            else:
                prompts = [(p if isinstance(p, str) else None,
                            r.prepare(p, None, params) if isinstance(p, str) else r.prepare(None, p, params))
                           for p in completion_prompts(body.get("prompt"))]
        except (BadRequest, ChatTemplateError, StructuredOutputError, ValueError, TypeError) as e:
            return _error(400, str(e))
        rid = r.new_id()
        n = params.n
        groups = [[Choice(p * n + j, rid if len(prompts) == 1 else f"{rid}-{p}", text, ids, j) for j in range(n)]
                  for p, (text, ids) in enumerate(prompts)]  # one router request per prompt, n choices each
        jobs = [c for group in groups for c in group]
        reply = ResponseBuilder(rid, r.model_name, chat, bool(body.get("echo")) and not chat, r.tokenizer, params,
                                bool(body.get("return_token_ids")))
        if body.get("stream"):
            return await self._stream(request, groups, reply,
                                      bool((body.get("stream_options") or {}).get("include_usage")))
        try:
            await asyncio.gather(*(self._collect(group, params) for group in groups))
        except asyncio.CancelledError:
            for group in groups:
                r.abort(group[0].rid)
            raise
        failed = next((j for j in jobs if j.reason == "error"), None)
        if failed is not None:
            status = 503 if (failed.error or "").startswith("overloaded") else 500
            return _error(status, failed.error or "request failed", "server_error")
        return web.json_response(reply.response(jobs))

    async def _collect(self, group: list[Choice], params) -> None:
        """One prompt's request: its deltas to its choices by `index`."""
        async for d in self.router.generate(group[0].rid, group[0].ids, params, group[0].prompt):
            group[d.index].add(d)

    async def _stream(self, request, groups: list[list[Choice]], reply: ResponseBuilder, include_usage: bool):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()
        jobs = [c for group in groups for c in group]

        async def pump(group):
            async for d in self.router.generate(group[0].rid, group[0].ids, reply.params, group[0].prompt):
                queue.put_nowait((group[d.index], d))

        tasks = [asyncio.create_task(pump(group)) for group in groups]
        open_jobs = len(jobs)
        try:
            while open_jobs:
                job, d = await queue.get()
                if d.finished:
                    open_jobs -= 1
                if d.finished and d.finish_reason == "error":
                    err = {"error": {"message": d.error, "type": "server_error"}}
                    await resp.write(f"data: {json.dumps(err)}\n\n".encode())
                    break
                job.prompt_logprobs = d.prompt_logprobs or job.prompt_logprobs
                chunk = reply.chunk(job, d)
                job.add(d)
                await resp.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            if include_usage and not open_jobs:
                await resp.write(f"data: {json.dumps(reply.usage_chunk(jobs))}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away: cancelling the pumps aborts its requests
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return resp
