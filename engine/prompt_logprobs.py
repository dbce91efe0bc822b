"""Logprobs of prompt tokens (OpenAI `echo` with `logprobs`, vLLM's `prompt_logprobs`), computed
while the prompt is prefilled.

Position p's logits predict token p + 1, so a prefill chunk covering prompt positions
[start, start + n) yields the logprobs of prompt tokens start + 1 .. start + n (capped at the last
prompt token); the first prompt token has none (None). A request that asks for them is prefilled
from position 0 (no prefix-cache reuse: a reused page has no logits), and a recompute after
preemption before the first token starts its list again. The list travels out with the request's
first sampled token. Computing them reads the logits on the host at launch, so a step holding such a
chunk does not overlap with the next one (only requests that ask pay for this).
Nothing here touches the scheduler's queues; the runner calls `collect` once per eager step and the
engine core calls `pop` when it reports a first token (and `discard` when a request ends early).
"""
from __future__ import annotations

import torch

_ROWS_PER_SLICE = 256  # logits of this many rows at once bound the memory (rows × vocab floats)


def wants_prompt_logprobs(request) -> bool:
    return getattr(request.sampling_params, "prompt_logprobs", None) is not None


def computes_prompt_logprobs(chunk) -> bool:
    """The chunk computes prompt positions of a request that wants their logprobs (every row's hidden
    state is then read, not only the last)."""
    return wants_prompt_logprobs(chunk.request) and chunk.start < chunk.request.num_prompt_tokens


class PromptLogprobs:
    """Per-request prompt logprobs under construction (request id → list aligned with the prompt)."""

    def __init__(self):
        self._lists: dict[str, list] = {}

    def collect(self, model: torch.nn.Module, hidden: torch.Tensor, chunks: list) -> None:
        """`hidden` holds the chunks' rows back to back, in `chunks` order (the runner's eager batch)."""
        row = 0
        for c in chunks:
            first_row, row = row, row + c.num_new_tokens
            req = c.request
            if not wants_prompt_logprobs(req) or c.start >= req.num_prompt_tokens:
                continue
            if c.start == 0:
                if req.num_output_tokens:
                    continue  # a recompute after preemption: the list already went out with the first token
                self._lists[req.request_id] = [None]
            entries = self._lists.get(req.request_id)
            if entries is None or len(entries) != c.start + 1:
                continue  # started mid-prompt (cannot happen without prefix reuse): nothing consistent to add
            last = min(c.start + c.num_new_tokens, req.num_prompt_tokens - 1)  # last prompt position predicted
            for lo in range(c.start, last, _ROWS_PER_SLICE):
                hi = min(lo + _ROWS_PER_SLICE, last)
                rows = hidden[first_row + lo - c.start: first_row + hi - c.start]
                entries += prompt_token_logprobs(model.compute_logits(rows), req.prompt_token_ids[lo + 1: hi + 1],
                                                 req.sampling_params.prompt_logprobs)

    def pop(self, request_id: str) -> list | None:
        return self._lists.pop(request_id, None)

    def discard(self, request_id: str) -> None:
        self._lists.pop(request_id, None)


def prompt_token_logprobs(logits: torch.Tensor, targets: list[int], top_n: int) -> list[dict]:
    """One entry per row: the target token's logprob and rank, and the `top_n` best (the sampler's format)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, target[:, None])[:, 0]
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    top_vals, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (logprobs[:, :0], target[:, None][:, :0])
    chosen, ranks, top_vals, top_ids = chosen.tolist(), ranks.tolist(), top_vals.tolist(), top_ids.tolist()
    return [{"token_id": t, "logprob": chosen[i], "rank": ranks[i],
             "top_logprobs": {int(k): float(v) for k, v in zip(top_ids[i], top_vals[i])}}
            for i, t in enumerate(targets)]
