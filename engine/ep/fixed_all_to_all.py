"""Fixed-capacity token all-to-all: the always-available EP path, graph-safe, on plain
`torch.distributed` collectives.

Every dispatch moves exactly `capacity` rows from each rank to each rank with one
`all_to_all_single` of equal splits, so no size depends on the routing: no count exchange, no
host read, and NCCL can capture it in a CUDA graph. A row carries one token's hidden state with
its physical slot ids and routing weights packed behind it (bit-cast to the hidden dtype, so one
collective moves both); rows past the sender's token count are padding with slot -1. The
receiver turns slot ids into local ones (outside `[0, slots_per_rank)` where another rank owns
the slot) and runs the grouped expert GEMM over all `ranks x capacity` rows: a row with no local
slot costs no GEMM work and returns zeros.
Combine is the reverse all-to-all of those partial sums, added up per token in float32.

Each rank sends its whole token block to every rank, whether or not a token has an expert there.
With few ranks nearly every token has one (top-6 of 64 experts over 2 ranks: 98.8 %), so this is
what a count-based exchange would send; at many ranks a compacting kernel (DeepEP) sends less,
which fixed-size collectives cannot express.

Calls come in start / finish pairs: in between the collective is in flight (its own NCCL stream,
or gloo's worker thread), which lets the caller overlap one micro-batch's transfer with another's
expert compute. Every rank must pass the same `capacity` for the same dispatch; the EP runtime
agrees it once per step (`engine/ep/step_plan.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.ep.all_to_all import Dispatched
from engine.ep.group import EPGroup


@dataclass
class _InFlight:
    work: object  # the collective's torch.distributed Work (None: it ran blocking)
    recv: torch.Tensor
    num_tokens: int  # this rank's real tokens in the block (the rest is padding)
    capacity: int
    k: int = 0
    dtype: torch.dtype | None = None  # the hidden dtype (dispatch rows travel as bytes)
    hidden_bytes: int = 0


class FixedCapacityAllToAll:
    name = "fixed"
    graph_safe = True

    def __init__(self, group: EPGroup, slots_per_rank: int):
        self.group, self.slots_per_rank = group, slots_per_rank

    def _all_to_all(self, recv: torch.Tensor, send: torch.Tensor):
        # Async (a Work to wait on) so micro-batches overlap; blocking while a CUDA graph is being
        # captured, the form NCCL capture is known to support (a graph step has one micro-batch).
        capturing = send.is_cuda and torch.cuda.is_current_stream_capturing()
        return dist.all_to_all_single(recv, send, group=self.group.group, async_op=not capturing)

    # ------------------------------------------------------------- dispatch
    def start_dispatch(self, hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor,
                       capacity: int) -> _InFlight:
        t, h = hidden.shape
        k = slot_ids.shape[1]
        if t > capacity:
            raise ValueError(f"EP dispatch of {t} tokens exceeds the agreed capacity of {capacity} rows per rank")
        # Rows are bytes: the hidden state, then (4-byte aligned) slot ids as float32 (exact below
        # 2^24; padding rows carry -1) and float32 weights: one collective moves all three bit for
        # bit, and they are written straight into the buffer (a few kernels, no concatenation).
        hb = h * hidden.element_size()
        off = -(-hb // 4) * 4
        send = torch.empty((self.group.size, capacity, off + 8 * k), dtype=torch.uint8, device=hidden.device)
        send[:, :t, :hb] = hidden.contiguous().view(torch.uint8)
        meta = send[:, :, off:].view(torch.float32)
        meta[:, :t, :k] = slot_ids
        meta[:, :t, k:] = topk_weights
        if t < capacity:
            send[:, t:, :hb] = 0
            meta[:, t:, :k] = -1.0
        recv = torch.empty_like(send)
        return _InFlight(self._all_to_all(recv, send), recv, t, capacity, k, hidden.dtype, hb)

    def finish_dispatch(self, pending: _InFlight) -> Dispatched:
        if pending.work is not None:
            pending.work.wait()
        recv, k, hb = pending.recv, pending.k, pending.hidden_bytes
        rows = recv.shape[0] * recv.shape[1]
        hidden = recv[..., :hb].view(pending.dtype).reshape(rows, -1)
        meta = recv[..., recv.shape[2] - 8 * k:].contiguous().view(torch.float32).view(rows, 2 * k)
        # Local slot ids: those of other ranks (and padding's -1) fall outside [0, slots_per_rank),
        # which the expert GEMM skips, so no mask is needed.
        local = meta[:, :k].to(torch.int32) - self.group.rank * self.slots_per_rank
        return Dispatched(hidden, local, meta[:, k:], (pending.num_tokens, pending.capacity))

    # ------------------------------------------------------------- combine
    def start_combine(self, partial: torch.Tensor, handle) -> _InFlight:
        num_tokens, capacity = handle
        send = partial.contiguous().view(self.group.size, capacity, -1)
        recv = torch.empty_like(send)
        return _InFlight(self._all_to_all(recv, send), recv, num_tokens, capacity)

    def finish_combine(self, pending: _InFlight) -> torch.Tensor:
        if pending.work is not None:
            pending.work.wait()
        # recv[s, t]: rank s's partial sum for our token t; add the ranks up in float32.
        return pending.recv[:, : pending.num_tokens].sum(dim=0, dtype=torch.float32).to(pending.recv.dtype)

    # ------------------------------------------------------------- one-shot (every rank sends `capacity`)
    def dispatch(self, hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor,
                 capacity: int | None = None) -> Dispatched:
        """Blocking form; `capacity` defaults to this rank's token count (then it must be the same
        on every rank)."""
        return self.finish_dispatch(self.start_dispatch(hidden, slot_ids, topk_weights,
                                                        hidden.shape[0] if capacity is None else capacity))

    def combine(self, partial: torch.Tensor, handle) -> torch.Tensor:
        return self.finish_combine(self.start_combine(partial, handle))
