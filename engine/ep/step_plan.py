"""How one MoE layer's tokens travel in an EP step: the step plan every rank agrees on, and the
micro-batch pipeline that runs it (two-batch overlap).

* The plan. A fixed-capacity dispatch moves the same number of rows on every rank, so the ranks
  must agree on it: once per step they all-reduce the most tokens any of them runs
  (`ExpertParallel.step_begin`) and derive the same plan from it. A step that fits the decode
  CUDA-graph buckets takes the bucket as its capacity, one dispatch per layer, so a rank that
  replays its graph, a rank that runs eagerly and an idle rank all move the same rows. A larger
  step is split into dispatches of at most `ep_dispatch_capacity` tokens per rank (no token is
  ever dropped), and from `ep_overlap_min_tokens` on into at least two micro-batches.
* The pipeline. Micro-batch i+1's dispatch is in flight while micro-batch i's experts run, and
  i's combine while i+1's experts run (async collectives: on CUDA they run on the communicator's
  stream beside the compute stream; on gloo in its worker thread, with identical results).
  Every rank issues the same collectives in the same order: d0 d1 c0 d2 c1 ... c(n-1).
* Two-batch overlap across whole layers (`ep_two_batch_min_tokens`, engine/ep/two_batch.py): a
  step whose busiest rank runs at least that many tokens is split on every rank into two
  micro-batches that run the whole model interleaved; each micro-batch's dispatches are planned
  for half the step (`two_batch`), so a micro-batch never exceeds the agreed capacity.
* Padding. Inside a CUDA graph the batch is padded to its bucket; rows past the device count
  `num_real_tokens` are routed nowhere and counted nowhere (set before each replay, no host sync).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepPlan:
    capacity: int  # rows per rank in one dispatch (the same on every rank)
    num_chunks: int  # dispatches per MoE layer (micro-batches)
    bucket: bool = False  # capacity is a decode CUDA-graph bucket: graphs of that size may replay
    padded: bool = False  # rows past `num_real_tokens` are padding (set while capturing a graph)
    two_batch: bool = False  # every rank runs this step as two interleaved micro-batches of <= half


def plan_step(max_tokens: int, dispatch_capacity: int, overlap_min_tokens: int,
              graph_buckets: tuple[int, ...] = (), two_batch_min_tokens: int = 0) -> StepPlan:
    """The plan for a step whose busiest rank runs `max_tokens` tokens (pure function: every rank
    derives the same plan from the same inputs)."""
    bucket = next((b for b in graph_buckets if b >= max_tokens), None)
    if bucket is not None:
        return StepPlan(bucket, 1, bucket=True)
    if two_batch_min_tokens and max_tokens >= max(2, two_batch_min_tokens):
        half = -(-max_tokens // 2)  # the larger micro-batch of the busiest rank
        chunks = -(-half // dispatch_capacity)
        return StepPlan(-(-half // chunks), chunks, two_batch=True)
    chunks = max(1, -(-max_tokens // dispatch_capacity))
    if overlap_min_tokens and max_tokens >= overlap_min_tokens:
        chunks = max(chunks, 2)
    return StepPlan(max(1, -(-max_tokens // chunks)), chunks)


def mask_padding(topk_ids: torch.Tensor, num_real_tokens: torch.Tensor) -> torch.Tensor:
    """Routes of rows at or past `num_real_tokens` (a device scalar) become -1 (no expert)."""
    rows = torch.arange(topk_ids.shape[0], device=topk_ids.device).unsqueeze(1)
    return torch.where(rows < num_real_tokens, topk_ids, torch.full_like(topk_ids, -1))


def run_pipelined(all_to_all, experts, hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor,
                  plan: StepPlan, after_start=None) -> torch.Tensor:
    """Dispatch, expert compute and combine over `plan.num_chunks` micro-batches of at most
    `plan.capacity` tokens, overlapped as the module docstring describes. `experts(hidden,
    topk_weights, local_ids)` is the layer's local grouped GEMM; `after_start()`, if given, runs
    after each collective is started (two-batch overlap hands the other micro-batch its turn there)."""
    after_start = after_start or (lambda: None)
    c, n = plan.capacity, plan.num_chunks
    if hidden.shape[0] > c * n:
        raise ValueError(f"{hidden.shape[0]} tokens do not fit the step plan ({n} dispatches of {c})")

    def start(i: int):
        s = slice(i * c, (i + 1) * c)  # past this rank's tokens the slice is empty: padding only
        pending = all_to_all.start_dispatch(hidden[s], slot_ids[s], topk_weights[s], c)
        after_start()
        return pending

    outs, combining, upcoming = [], None, start(0)
    for i in range(n):
        current, upcoming = upcoming, (start(i + 1) if i + 1 < n else None)
        sent = all_to_all.finish_dispatch(current)
        pending = all_to_all.start_combine(experts(sent.hidden, sent.topk_weights, sent.topk_ids), sent.handle)
        after_start()
        if combining is not None:
            outs.append(all_to_all.finish_combine(combining))
        combining = pending
    outs.append(all_to_all.finish_combine(combining))
    return outs[0] if n == 1 else torch.cat(outs)
