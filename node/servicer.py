"""The node API both roles answer the same way (`Info`, `Abort`), and an engine delta as the
proto a node streams back to the router."""
from __future__ import annotations

import asyncio

from node.core import Node
from proto import convert
from proto import pdserve_pb2 as pb


class NodeServicerBase:
    """`Info` and `Abort`, the same on both node kinds."""

    node: Node

    async def Info(self, request, context):
        return await asyncio.get_running_loop().run_in_executor(None, self.node.info)

    async def Abort(self, request, context):
        index = request.index if request.HasField("index") else None
        return pb.AbortResponse(found=self.node.abort(request.request_id, index))


def delta_to_proto(rid: str, delta) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=rid, token_ids=list(delta.token_ids), finished=delta.finished,
                              index=delta.index,
                              logprobs=convert.logprobs_to_proto(delta.logprobs),
                              prompt_logprobs=convert.prompt_logprobs_to_proto(delta.prompt_logprobs))
    if delta.finished:
        msg.finish_reason = delta.finish_reason or ""
        msg.stop_reason = "" if delta.stop_reason is None else str(delta.stop_reason)
        msg.error = delta.error or ""
    return msg
