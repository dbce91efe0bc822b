"""Field mapping between the proto messages and the engine's dataclasses (no behaviour here)."""
from __future__ import annotations

from proto import pdserve_pb2 as pb

_OPTIONAL = ("max_tokens", "temperature", "top_p", "repetition_penalty", "seed", "logprobs", "prompt_logprobs", "n")
_PLAIN = ("min_tokens", "top_k", "min_p", "presence_penalty", "frequency_penalty", "ignore_eos",
          "include_stop_str_in_output")


def params_from_proto(msg: "pb.SamplingParams"):
    """→ engine SamplingParams (raises ValueError naming the field on impossible values)."""
    from engine.sampling_params import SamplingParams

    kw = {name: getattr(msg, name) for name in _PLAIN}
    for name in _OPTIONAL:
        if msg.HasField(name):
            kw[name] = getattr(msg, name)
    kw.setdefault("temperature", 0.0)
    kw["stop"] = list(msg.stop)
    kw["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.structured_output_kind:
        kw["structured_output"] = (msg.structured_output_kind, msg.structured_output)
    return SamplingParams(**kw)


def params_to_proto(p) -> "pb.SamplingParams":
    msg = pb.SamplingParams(stop=list(p.stop), stop_token_ids=list(p.stop_token_ids))
    for name in _PLAIN:
        setattr(msg, name, getattr(p, name))
    for name in _OPTIONAL:
        if getattr(p, name) is not None:
            setattr(msg, name, getattr(p, name))
    if p.structured_output is not None:
        msg.structured_output_kind, msg.structured_output = p.structured_output
    return msg


def layout_to_proto(d: dict) -> "pb.KVLayout":
    return pb.KVLayout(**d)


def layout_from_proto(msg: "pb.KVLayout") -> dict:
    return {"kind": msg.kind, "num_layers": msg.num_layers, "page_size": msg.page_size,
            "num_components": msg.num_components, "num_heads": msg.num_heads, "head_dim": msg.head_dim,
            "dtype": msg.dtype}


def dest_to_proto(d: dict) -> "pb.KVDestination":
    return pb.KVDestination(request_id=d["request_id"], agent_name=d["agent_name"],
                            agent_metadata=d["agent_metadata"], layer_addrs=d["layer_addrs"],
                            page_ids=d["page_ids"], layout=layout_to_proto(d["layout"]),
                            incarnation=d.get("incarnation", ""), transfer_id=d.get("transfer_id") or "")


def dest_from_proto(msg: "pb.KVDestination") -> dict:
    return {"request_id": msg.request_id, "agent_name": msg.agent_name, "agent_metadata": msg.agent_metadata,
            "layer_addrs": list(msg.layer_addrs), "page_ids": list(msg.page_ids),
            "layout": layout_from_proto(msg.layout), "incarnation": msg.incarnation, "dev_id": 0,
            "transfer_id": msg.transfer_id}


def logprobs_to_proto(entries: list) -> list:
    return [pb.Logprob(token_id=e["token_id"], logprob=e["logprob"], rank=e["rank"],
                       top_logprobs={int(k): float(v) for k, v in e["top_logprobs"].items()})
            for e in entries if e]


def logprobs_from_proto(msgs) -> list[dict]:
    return [{"token_id": m.token_id, "logprob": m.logprob, "rank": m.rank,
             "top_logprobs": dict(m.top_logprobs)} for m in msgs]


def prompt_logprobs_to_proto(entries: list | None) -> list:
    """Prompt logprobs (None for the first token, which nothing predicts) → Logprob messages of tokens 1..n-1."""
    return logprobs_to_proto(entries[1:]) if entries else []


def prompt_logprobs_from_proto(msgs) -> list | None:
    return [None] + logprobs_from_proto(msgs) if len(msgs) else None


def output_from_proto(msg, num_cached_tokens: int = 0):
    """A node's token delta (`GenerateResponse`, or the first token's `PrefillResponse`) → engine
    RequestOutput (token-level fields only; the router's front fills the text)."""
    from engine.outputs import RequestOutput

    return RequestOutput(msg.request_id, list(msg.token_ids), logprobs_from_proto(msg.logprobs),
                         finished=msg.finished, finish_reason=msg.finish_reason or None,
                         stop_reason=msg.stop_reason or None, error=msg.error or None,
                         num_cached_tokens=num_cached_tokens,
                         prompt_logprobs=prompt_logprobs_from_proto(msg.prompt_logprobs),
                         index=getattr(msg, "index", 0))
