"""Fixed-capacity token all-to-all: the always-available EP path, graph-safe, on plain
`torch.distributed` collectives.

Every dispatch moves exactly `capacity` rows from each rank to each rank with one
`all_to_all_single` of equal splits, so no size depends on the routing: no count exchange, no
host read, and NCCL can capture it in a CUDA graph. `capacity` is the most tokens any rank sends
in this dispatch (a token goes at most once to each rank), not experts x tokens: the buffer is
`ranks x capacity` rows. One row is one token, as bytes:

    [payload | k int32 local slot ids | k float32 routing weights]

payload = the hidden state (bf16/fp32), or with FP8 dispatch its e4m3 bytes followed by one
float32 scale per token and 128 columns (half the bytes of bf16; FP8 experts that quantize their
activations in blocks of other widths pass theirs, so the experts' own quantization of the
received rows reproduces the dispatched FP8 values). The sender writes each
destination's *local* slot ids (slot - destination x slots_per_rank: ids outside
`[0, slots_per_rank)` mean "not on that rank"), so the receiver reads ids and weights as views of
the receive buffer with no conversion. Rows past the sender's token count are padding (zeros,
ids -1). The receiver runs the grouped expert GEMM over all `ranks x capacity` rows: a row with
no local slot costs no GEMM work and returns zeros. Combine is the reverse all-to-all of those
partial sums (in the compute dtype), added up per token by one reduction (float32 accumulation).
So a dispatch is 3 small pack kernels + 1 collective (+1 dequantize with FP8), a combine 1
collective + 1 reduction.

Each rank sends its whole token block to every rank, whether or not a token has an expert there.
With few ranks nearly every token has one (top-8 of 256 experts over 2 ranks: 99.6 %), so this is
what a count-based exchange would send; at many ranks a compacting kernel (DeepEP) sends less,
which fixed-size collectives cannot express.

Calls come in start / finish pairs: in between the collective is in flight (its own NCCL stream,
or gloo's worker thread), which lets the caller overlap one micro-batch's transfer with another's
compute. Every rank must pass the same `capacity` for the same dispatch; the EP runtime agrees it
once per step (`engine/ep/step_plan.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.ep.all_to_all import Dispatched
from engine.ep.group import EPGroup

FP8_GROUP = 128  # columns per activation scale by default (DeepSeek-V3's activation block)


@dataclass
class _InFlight:
    work: object  # the collective's torch.distributed Work (None: it ran blocking)
    recv: torch.Tensor
    num_tokens: int  # this rank's real tokens in the block (the rest is padding)
    capacity: int
    k: int = 0
    dtype: torch.dtype | None = None  # the hidden dtype (dispatch rows travel as bytes)
    hidden: int = 0  # hidden size


class RowLayout:
    """Byte offsets of one dispatch row (see the module docstring)."""

    def __init__(self, hidden: int, k: int, dtype: torch.dtype, fp8: bool, group: int = FP8_GROUP):
        self.hidden, self.k, self.fp8 = hidden, k, fp8
        self.groups = -(-hidden // group)
        self.scales = -(-hidden // 4) * 4  # FP8: float32 scales after the e4m3 bytes, 4-byte aligned
        payload = self.scales + 4 * self.groups if fp8 else hidden * torch.empty((), dtype=dtype).element_size()
        self.ids = -(-payload // 4) * 4
        self.weights = self.ids + 4 * k
        self.row_bytes = self.weights + 4 * k


def quantize_rows(x: torch.Tensor, group: int = FP8_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[T, H]` → (e4m3 `[T, H]`, float32 scales `[T, ceil(H/group)]`): per token and column
    group, the absolute maximum maps to the largest FP8 value (engine/kernels/fp8_ref.py's rule)."""
    if x.is_cuda:
        from engine.kernels.fp8_gemm import quantize_activation  # one Triton kernel
        return quantize_activation(x.contiguous(), group)
    from engine.kernels.fp8_ref import quantize_activation_ref
    return quantize_activation_ref(x, group)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, group: int = FP8_GROUP) -> torch.Tensor:
    t, h = q.shape
    g = scale.shape[1]
    full = torch.nn.functional.pad(q.float(), (0, g * group - h)).view(t, g, group)
    return (full * scale.unsqueeze(-1)).view(t, g * group)[:, :h].to(dtype)


class FixedCapacityAllToAll:
    name = "fixed"
    graph_safe = True

    def __init__(self, group: EPGroup, slots_per_rank: int, fp8: bool = False, fp8_group: int = FP8_GROUP):
        self.group, self.slots_per_rank, self.fp8, self.fp8_group = group, slots_per_rank, fp8, fp8_group
        if fp8:
            self.name = "fixed+fp8"
        # Slot offset of each destination rank, subtracted while packing (kept on the device).
        self._offsets = (torch.arange(group.size, dtype=torch.int32, device=group.device)
                         * slots_per_rank).view(-1, 1, 1)

    def _exchange(self, send: torch.Tensor, phase: str) -> tuple[object, torch.Tensor]:
        """Block `send[r]` to rank r; returns (Work to wait on or None, recv) with recv[s] from rank s.
        `phase` (dispatch | combine) lets a transport keep separate buffers per direction."""
        # Async (a Work to wait on) so micro-batches overlap; blocking while a CUDA graph is being
        # captured, the form NCCL capture is known to support (a graph step has one micro-batch).
        capturing = send.is_cuda and torch.cuda.is_current_stream_capturing()
        recv = torch.empty_like(send)
        return dist.all_to_all_single(recv, send, group=self.group.group, async_op=not capturing), recv

    def for_plan(self, plan) -> "FixedCapacityAllToAll":
        """The transport for a step plan (a subclass may need one dispatch in flight at a time)."""
        return self

    # ------------------------------------------------------------- dispatch
    def pack(self, hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor,
             capacity: int) -> torch.Tensor:
        """The send buffer `[ranks, capacity, row bytes]`: block r is what rank r receives from us."""
        t, h = hidden.shape
        k = slot_ids.shape[1]
        if t > capacity:
            raise ValueError(f"EP dispatch of {t} tokens exceeds the agreed capacity of {capacity} rows per rank")
        lay = RowLayout(h, k, hidden.dtype, self.fp8, self.fp8_group)
        send = torch.empty((self.group.size, capacity, lay.row_bytes), dtype=torch.uint8, device=hidden.device)
        if t < capacity:  # padding rows: zero payload and weights, no slot
            send[:, t:].zero_()
            send[:, t:, lay.ids: lay.weights].view(torch.int32).fill_(-1)
        if t:
            rows = send[:, :t]
            if self.fp8:
                q, scale = quantize_rows(hidden, self.fp8_group)
                rows[..., :h].copy_(q.view(torch.uint8).unsqueeze(0).expand(self.group.size, -1, -1))
                rows[..., lay.scales: lay.scales + 4 * lay.groups].view(torch.float32).copy_(
                    scale.unsqueeze(0).expand(self.group.size, -1, -1))
            else:
                rows[..., : lay.ids].view(hidden.dtype)[..., :h].copy_(hidden.unsqueeze(0).expand(
                    self.group.size, -1, -1))
            # Each destination's local slot ids: a masked route (-1) stays negative, another
            # rank's slot falls outside [0, slots_per_rank); one kernel writes all destinations.
            torch.sub(slot_ids.unsqueeze(0), self._offsets, out=rows[..., lay.ids: lay.weights].view(torch.int32))
            rows[..., lay.weights:].view(torch.float32).copy_(topk_weights.unsqueeze(0).expand(
                self.group.size, -1, -1))
        return send

    def start_dispatch(self, hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor,
                       capacity: int) -> _InFlight:
        send = self.pack(hidden, slot_ids, topk_weights, capacity)
        return _InFlight(*self._exchange(send, "dispatch"), hidden.shape[0], capacity, slot_ids.shape[1],
                         hidden.dtype, hidden.shape[1])

    def finish_dispatch(self, pending: _InFlight) -> Dispatched:
        if pending.work is not None:
            pending.work.wait()
        recv, k, h = pending.recv, pending.k, pending.hidden
        lay = RowLayout(h, k, pending.dtype, self.fp8, self.fp8_group)
        rows = recv.view(-1, lay.row_bytes)
        if self.fp8:
            hidden = dequantize_rows(rows[:, :h].view(torch.float8_e4m3fn),
                                     rows[:, lay.scales: lay.scales + 4 * lay.groups].view(torch.float32),
                                     pending.dtype, self.fp8_group)
        else:
            hidden = rows[:, : lay.ids].view(pending.dtype)[:, :h]
        ids = rows[:, lay.ids: lay.weights].view(torch.int32)
        weights = rows[:, lay.weights:].view(torch.float32)
        return Dispatched(hidden, ids, weights, (pending.num_tokens, pending.capacity))

    # ------------------------------------------------------------- combine
    def start_combine(self, partial: torch.Tensor, handle) -> _InFlight:
        num_tokens, capacity = handle
        send = partial.contiguous().view(self.group.size, capacity, -1)
        return _InFlight(*self._exchange(send, "combine"), num_tokens, capacity)

    def finish_combine(self, pending: _InFlight) -> torch.Tensor:
        if pending.work is not None:
            pending.work.wait()
        # recv[s, t]: rank s's partial sum for our token t. One reduction over the ranks; torch
        # accumulates bf16/fp16 sums in float32 and rounds once.
        return pending.recv[:, : pending.num_tokens].sum(dim=0)

    # ------------------------------------------------------------- one-shot (every rank sends `capacity`)
    def dispatch(self, hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor,
                 capacity: int | None = None) -> Dispatched:
        """Blocking form; `capacity` defaults to this rank's token count (then it must be the same
        on every rank)."""
        return self.finish_dispatch(self.start_dispatch(hidden, slot_ids, topk_weights,
                                                        hidden.shape[0] if capacity is None else capacity))

    def combine(self, partial: torch.Tensor, handle) -> torch.Tensor:
        return self.finish_combine(self.start_combine(partial, handle))
