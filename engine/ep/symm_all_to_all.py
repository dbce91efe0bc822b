"""Symmetric-memory transport for the fixed-capacity rows (CUDA only, `--ep-backend symm`, opt-in
until a two-GPU run measures it): no NCCL, one Triton kernel per direction writes the rows straight
into the peers' buffers over NVLink, then one device barrier.

Same rows, same receive layout and same results as `FixedCapacityAllToAll` (it only replaces how
the bytes travel): dispatch = [FP8 quantize] + `put_rows` + barrier, and the receiver reads ids,
weights and payload in place from its symmetric buffer; combine = `put_rows` of the partial sums +
barrier + one reduction. `torch.distributed._symmetric_memory` (torch >= 2.5; 2.11 on the device)
allocates one buffer per rank mapped into every peer, with a dispatch and a combine region of
`ranks x max_tokens_per_rank` rows each.

One barrier per direction is enough because the two regions alternate: a rank writes a peer's
dispatch region only after the previous combine barrier, which the peer reaches after the expert
GEMM that read the region (same stream), and writes a peer's combine region only after the
dispatch barrier, which the peer reaches after summing the previous combine. That holds while one
dispatch is in flight at a time, so steps planned with several dispatches in flight (split
prefill, per-layer or two-batch overlap) and dispatches larger than the regions take the NCCL
path (`for_plan`, the capacity check): decisions every rank makes alike from the agreed plan.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.ep.fixed_all_to_all import FixedCapacityAllToAll, RowLayout, _InFlight, quantize_rows


@triton.jit
def _put_rows_kernel(peers, region_words, row_words, num_real, src_a, a_words, stride_a, src_b, b_words, stride_b,
                     b_at, ids, k, ids_at, weights, weights_at, slots_per_rank, src_rank_rows,
                     BLOCK: tl.constexpr, KB: tl.constexpr):
    row = tl.program_id(0)
    r = tl.program_id(1)
    dst = tl.load(peers + r).to(tl.pointer_type(tl.int32)) + region_words + row.to(tl.int64) * row_words
    src_row = (r * src_rank_rows + row).to(tl.int64)
    lane = tl.arange(0, BLOCK)
    real = (lane * 0 + row) < num_real  # as a block: the interpreter rejects scalar & block masks
    for start in range(0, a_words, BLOCK):
        m = start + lane < a_words
        tl.store(dst + start + lane, tl.load(src_a + src_row * stride_a + start + lane, mask=m & real, other=0),
                 mask=m)
    for start in range(0, b_words, BLOCK):
        m = start + lane < b_words
        tl.store(dst + b_at + start + lane,
                 tl.load(src_b + src_row * stride_b + start + lane, mask=m & real, other=0), mask=m)
    kk = tl.arange(0, KB)
    mk = kk < k
    real_k = (kk * 0 + row) < num_real
    slot = tl.load(ids + src_row * k + kk, mask=mk & real_k, other=0)
    local = tl.where(real_k, slot - r * slots_per_rank, -1)
    tl.store(dst + ids_at + kk, local.to(tl.int32), mask=mk)
    w = tl.load(weights + src_row * k + kk, mask=mk & real_k, other=0.0)
    tl.store((dst + weights_at + kk).to(tl.pointer_type(tl.float32)), w.to(tl.float32), mask=mk)


def put_rows(peers: torch.Tensor, region_bytes: int, row_bytes: int, capacity: int, num_real: int,
             a: torch.Tensor, b: torch.Tensor | None = None, b_at: int = 0, ids: torch.Tensor | None = None,
             ids_at: int = 0, weights: torch.Tensor | None = None, weights_at: int = 0, slots_per_rank: int = 0,
             src_rank_rows: int = 0) -> None:
    """For each destination rank r (`peers[r]`: the address of r's buffer) and row i < capacity,
    write at byte `region_bytes + i * row_bytes` of r's buffer: source row `r * src_rank_rows + i`
    of `a` (then of `b` at byte `b_at`), and, given `ids` `[T, k]`, the local slots `ids - r *
    slots_per_rank` (int32 at `ids_at`) and `weights` (float32 at `weights_at`). Rows at or past
    `num_real` are padding: zeros, slot -1. `a`, `b`: 2-D, rows of whole 4-byte words."""
    world = peers.shape[0]
    words = lambda x: x.view(torch.int32) if x is not None else a.view(torch.int32)  # noqa: E731
    src_a, src_b = words(a), words(b)
    k = ids.shape[1] if ids is not None else 0
    ids = ids.contiguous() if ids is not None else src_a
    weights = weights.float().contiguous() if weights is not None else src_a
    _put_rows_kernel[(capacity, world)](
        peers, region_bytes // 4, row_bytes // 4, num_real, src_a, src_a.shape[1], src_a.stride(0), src_b,
        src_b.shape[1] if b is not None else 0, src_b.stride(0), b_at // 4, ids, k, ids_at // 4, weights,
        weights_at // 4, slots_per_rank, src_rank_rows, BLOCK=1024, KB=max(triton.next_power_of_2(k), 2))


def put_rows_of_dispatch(peers: torch.Tensor, region_bytes: int, lay: RowLayout, capacity: int, hidden: torch.Tensor,
                         slot_ids: torch.Tensor, topk_weights: torch.Tensor, slots_per_rank: int,
                         fp8_group: int = 128) -> None:
    """Every destination's block of dispatch rows (`FixedCapacityAllToAll.pack`'s bytes, its
    reference) written into the peers' buffers at `region_bytes`; FP8 rows are quantized first."""
    t = hidden.shape[0]
    if t == 0:  # an idle rank sends padding rows only; the kernel reads no source row
        hidden = hidden.new_zeros((1, hidden.shape[1]))
        slot_ids = torch.zeros((1, slot_ids.shape[1]), dtype=torch.int64, device=hidden.device)
        topk_weights = torch.zeros((1, slot_ids.shape[1]), device=hidden.device)
    if lay.fp8:
        q, scale = quantize_rows(hidden.contiguous(), fp8_group)
        a, b = q.view(torch.uint8), scale
    else:
        a, b = hidden.contiguous().view(torch.uint8), None
    put_rows(peers, region_bytes, lay.row_bytes, capacity, t, a, b, lay.scales, slot_ids, lay.ids, topk_weights,
             lay.weights, slots_per_rank)


class SymmetricMemoryAllToAll(FixedCapacityAllToAll):
    name = "symm"

    def __init__(self, group, slots_per_rank: int, hidden_size: int, top_k: int, max_tokens_per_rank: int,
                 dtype: torch.dtype, fp8: bool = False, fp8_group: int = 128):
        import torch.distributed._symmetric_memory as symm_mem

        super().__init__(group, slots_per_rank, fp8, fp8_group)
        if group.device.type != "cuda":
            raise ValueError("the symmetric-memory all-to-all needs CUDA devices")
        self.name = "symm+fp8" if fp8 else "symm"
        self._nccl = FixedCapacityAllToAll(group, slots_per_rank, fp8, fp8_group)
        lay = RowLayout(hidden_size, top_k, dtype, fp8, fp8_group)
        self.max_rows = max_tokens_per_rank
        row = max(lay.row_bytes, hidden_size * torch.empty((), dtype=dtype).element_size())
        self.region = -(-group.size * max_tokens_per_rank * row // 16) * 16  # bytes per direction
        name = group.group.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(name)
        self.buffer = symm_mem.empty(2 * self.region, dtype=torch.uint8, device=group.device)
        self.handle = symm_mem.rendezvous(self.buffer, name)
        self.peers = torch.tensor(self.handle.buffer_ptrs, dtype=torch.int64, device=group.device)

    def for_plan(self, plan) -> FixedCapacityAllToAll:
        return self if plan.num_chunks == 1 and not plan.two_batch else self._nccl

    def _fits(self, capacity: int, hidden: int) -> bool:
        """Rows of whole 4-byte words that fit the regions (else the NCCL path, alike on every rank)."""
        return capacity <= self.max_rows and hidden % (4 if self.fp8 else 2) == 0

    def start_dispatch(self, hidden, slot_ids, topk_weights, capacity: int) -> _InFlight:
        t, h = hidden.shape
        k = slot_ids.shape[1]
        if not self._fits(capacity, h):
            return self._nccl.start_dispatch(hidden, slot_ids, topk_weights, capacity)
        if t > capacity:
            raise ValueError(f"EP dispatch of {t} tokens exceeds the agreed capacity of {capacity} rows per rank")
        lay = RowLayout(h, k, hidden.dtype, self.fp8, self.fp8_group)
        me, block = self.group.rank, capacity * lay.row_bytes
        put_rows_of_dispatch(self.peers, me * block, lay, capacity, hidden, slot_ids, topk_weights, self.slots_per_rank,
                             self.fp8_group)
        self.handle.barrier(channel=0)
        recv = self.buffer[: self.group.size * block].view(self.group.size, capacity, lay.row_bytes)
        return _InFlight(None, recv, t, capacity, k, hidden.dtype, h)

    def start_combine(self, partial: torch.Tensor, handle) -> _InFlight:
        num_tokens, capacity = handle
        h = partial.shape[1]
        if not self._fits(capacity, h):
            return self._nccl.start_combine(partial, handle)
        row_bytes = h * partial.element_size()
        me, block = self.group.rank, capacity * row_bytes
        put_rows(self.peers, self.region + me * block, row_bytes, capacity, capacity,
                 partial.contiguous().view(torch.uint8), src_rank_rows=capacity)
        self.handle.barrier(channel=1)
        recv = self.buffer[self.region: self.region + self.group.size * block].view(partial.dtype)
        return _InFlight(None, recv.view(self.group.size, capacity, h), num_tokens, capacity)
