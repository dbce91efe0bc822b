"""The public gRPC `Generate` service of the router (server-streaming deltas, Abort). With an API
key, both methods need metadata `authorization: Bearer KEY` (UNAUTHENTICATED otherwise, before any
work); the standard health service stays open. With `sampling.n` > 1 every delta names its choice
(`index`) and each choice ends with its own finished delta, whose usage counts that choice."""
from __future__ import annotations

import grpc

from engine.outputs import RequestOutput
from proto import convert
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from router.core import BadRequest, Router
from router.http_api import key_matches


def delta_to_proto(d: RequestOutput) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=d.request_id, token_ids=d.token_ids, text=d.text, finished=d.finished,
                              index=d.index,
                              logprobs=convert.logprobs_to_proto(d.logprobs),
                              prompt_logprobs=convert.prompt_logprobs_to_proto(d.prompt_logprobs))
    if d.finished:
        msg.finish_reason = d.finish_reason or ""
        msg.stop_reason = d.stop_reason or ""
        msg.error = d.error or ""
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=d.num_prompt_tokens, completion_tokens=d.num_output_tokens,
                                    cached_tokens=d.num_cached_tokens))
    return msg


class GenerateServicer(pb_grpc.GenerateServicer):
    def __init__(self, router: Router, api_key: str | None = None):
        self.router = router
        self.api_key = api_key

    async def _authorize(self, context) -> None:
        if self.api_key is None:
            return
        auth = dict(context.invocation_metadata() or ()).get("authorization")
        if not key_matches(auth, self.api_key):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key "
                                "(send metadata authorization: Bearer KEY)")

    async def Generate(self, request: pb.GenerateRequest, context):
        await self._authorize(context)
        r = self.router
        rid = request.request_id or r.new_id()
        if rid in r.tasks:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} is already in flight")
        if request.model and request.model != r.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}; serving {r.model_name!r}")
        which = request.WhichOneof("prompt")
        try:
            params = convert.params_from_proto(request.sampling)
            ids = r.prepare(request.text if which == "text" else None,
                            list(request.token_ids.ids) if which == "token_ids" else None, params)
        except (BadRequest, ValueError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        async for delta in r.generate(rid, ids, params):
            yield delta_to_proto(delta)

    async def Abort(self, request, context):
        await self._authorize(context)
        return pb.AbortResponse(found=self.router.abort(request.request_id))
