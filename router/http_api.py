"""OpenAI-compatible HTTP API of the router (aiohttp): `/v1/completions`, `/v1/chat/completions`
(SSE streaming ending in `data: [DONE]`), `/v1/models`, `/health`, `/metrics`. Invalid requests
get HTTP 400 with an OpenAI-style error body; a client that disconnects aborts its request."""
from __future__ import annotations

import json
import time

from aiohttp import web

from engine.sampling_params import SamplingParams
from router.core import BadRequest, Router

_PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                 "include_stop_str_in_output", "skip_special_tokens")


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def _params(body: dict, chat: bool) -> SamplingParams:
    kw = {k: body[k] for k in _PARAM_FIELDS if k in body and body[k] is not None}
    if chat and "max_completion_tokens" in body:
        kw["max_tokens"] = body["max_completion_tokens"]
    kw.setdefault("temperature", 1.0)
    lp = body.get("logprobs")
    if chat:
        if lp:
            kw["logprobs"] = int(body.get("top_logprobs") or 0)
    elif lp is not None and lp is not False:
        kw["logprobs"] = int(lp)
    if body.get("n", 1) != 1:
        raise ValueError("n must be 1")
    return SamplingParams(**kw)


def chat_prompt(messages: list) -> str:
    """DeepSeek's chat format (the default tokenizer's): system text, then User/Assistant turns."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    parts, system = [], ""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError("each message needs a role and content")
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
        if m["role"] == "system":
            system += content
        elif m["role"] == "user":
            parts.append(f"<｜User｜>{content}")
        elif m["role"] == "assistant":
            parts.append(f"<｜Assistant｜>{content}<｜end▁of▁sentence｜>")
        else:
            raise ValueError(f"unknown message role {m['role']!r}")
    return system + "".join(parts) + "<｜Assistant｜>"


class HttpApi:
    def __init__(self, router: Router):
        self.router = router
        self.started = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=32 << 20)
        app.router.add_post("/v1/completions", lambda r: self._handle(r, chat=False))
        app.router.add_post("/v1/chat/completions", lambda r: self._handle(r, chat=True))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

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

    async def _handle(self, request: web.Request, chat: bool):
        r = self.router
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except (json.JSONDecodeError, ValueError) as e:
            return _error(400, f"invalid JSON body: {e}")
        if body.get("model") and body["model"] != r.model_name:
            return _error(404, f"unknown model {body['model']!r}; serving {r.model_name!r}", "not_found_error")
        try:
            params = _params(body, chat)
            if chat:
                ids = r.prepare(chat_prompt(body.get("messages")), None, params)
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                    prompt = prompt[0]
                if isinstance(prompt, str):
                    ids = r.prepare(prompt, None, params)
                elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                    ids = r.prepare(None, prompt, params)
                else:
                    raise BadRequest("prompt must be a string or a list of token ids")
        except (BadRequest, ValueError, TypeError) as e:
            return _error(400, str(e))
        rid = r.new_id()
        created = int(time.time())
        if body.get("stream"):
            return await self._stream(request, rid, ids, params, chat, created,
                                      bool((body.get("stream_options") or {}).get("include_usage")))
        text, reason, usage, token_ids, error = [], None, {}, [], None
        async for d in r.generate(rid, ids, params):
            text.append(d.text)
            token_ids += d.token_ids
            if d.finished:
                reason, error = d.finish_reason, d.error
                usage = d.usage()
        if reason == "error":
            status = 503 if error and error.startswith("overloaded") else 500
            return _error(status, error or "request failed", "server_error")
        choice = {"index": 0, "finish_reason": _reason(reason)}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return web.json_response({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                  "created": created, "model": r.model_name, "choices": [choice], "usage": usage,
                                  "token_ids": token_ids})

    async def _stream(self, request, rid, ids, params, chat, created, include_usage):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        first = True
        try:
            async for d in self.router.generate(rid, ids, params):
                if d.finished and d.finish_reason == "error":
                    err = {"error": {"message": d.error, "type": "server_error"}}
                    await resp.write(f"data: {json.dumps(err)}\n\n".encode())
                    break
                if chat:
                    delta = {"content": d.text}
                    if first:
                        delta["role"] = "assistant"
                    choice = {"index": 0, "delta": delta, "finish_reason": _reason(d.finish_reason)}
                else:
                    choice = {"index": 0, "text": d.text, "finish_reason": _reason(d.finish_reason)}
                choice["token_ids"] = d.token_ids  # extension: exact token accounting for benchmarks
                first = False
                chunk = {"id": rid, "object": obj, "created": created, "model": self.router.model_name,
                         "choices": [choice]}
                if d.finished and include_usage:
                    chunk["usage"] = d.usage()
                await resp.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, ConnectionError):
            self.router.abort(rid)  # the client went away
        return resp


def _reason(reason: str | None) -> str | None:
    return None if reason is None else {"abort": "abort", "error": "error"}.get(reason, reason)
