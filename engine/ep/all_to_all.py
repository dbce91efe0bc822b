"""Token dispatch / combine across EP ranks, behind one interface.

`dispatch(hidden, slot_ids, topk_weights)` sends each token once to every rank that owns one of
its routed physical expert slots and returns what this rank must compute: the received tokens,
their top-k ids translated to *local* slots (-1, or any id outside the local range, where the slot
lives elsewhere) and their routing weights. The caller runs the same grouped expert GEMM whatever
the backend (`fused_experts(recv_hidden, w13_local, w2_local, recv_weights, recv_local_ids)`,
which weights and sums a token's local experts), and `combine(partial, handle)` sends each partial
sum back to the token's rank and adds them up. Routing, weights, permutation and the expert GEMM
therefore never depend on how tokens travel. The engine picks the backend in one place,
`engine/ep/runtime.py:select_all_to_all`.

Backends:
* `FixedCapacityAllToAll` (`fixed_all_to_all.py`): equal-split all-to-alls of an agreed number of
  rows per rank; no host sync, CUDA-graph safe. The default where DeepEP cannot load.
* `TorchAllToAll`: `torch.distributed.all_to_all_single` with per-rank counts (NCCL on GPU, gloo
  on CPU). Always available; it reads the counts on the host, so it cannot run inside a CUDA
  graph.
* `DeepEPAllToAll`: the DeepEP `Buffer` API, from `deep_ep` or from `nixl_ep` (shipped in the
  nixl wheel; same dispatch/combine contract, `ht_*` names for normal mode). Normal mode for
  prefill-sized batches; low-latency mode (fixed-shape buffers, graph-safe) for decode. Its
  low-latency layout `[local_experts, max_tokens * ranks, hidden]` is flattened into rows with
  one local expert id each, so the same grouped GEMM runs on it.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.ep.group import EPGroup


@dataclass
class Dispatched:
    hidden: torch.Tensor  # [N, H] tokens this rank computes
    topk_ids: torch.Tensor  # [N, k'] local slot ids; outside [0, local slots) (e.g. -1) = not on this rank
    topk_weights: torch.Tensor  # [N, k'] float32
    handle: object


class TorchAllToAll:
    name = "torch"
    graph_safe = False

    def __init__(self, group: EPGroup, slots_per_rank: int):
        self.group, self.slots_per_rank = group, slots_per_rank

    def dispatch(self, hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor) -> Dispatched:
        num_ranks, per_rank = self.group.size, self.slots_per_rank
        t, k = slot_ids.shape
        slot_ids = slot_ids.long()
        valid = slot_ids >= 0
        dest = torch.where(valid, slot_ids // per_rank, torch.full_like(slot_ids, num_ranks))
        # token_in_rank[t, r]: token t has at least one expert on rank r (sent once per rank).
        token_in_rank = torch.zeros(t, num_ranks + 1, dtype=torch.bool, device=hidden.device)
        token_in_rank.scatter_(1, dest, True)
        token_in_rank = token_in_rank[:, :num_ranks]
        rank_idx, token_idx = token_in_rank.t().nonzero(as_tuple=True)  # grouped by destination rank
        send_counts = token_in_rank.sum(0).to(torch.int64)
        send_local = slot_ids[token_idx] - rank_idx.unsqueeze(1) * per_rank
        send_local = torch.where(dest[token_idx] == rank_idx.unsqueeze(1), send_local, torch.full_like(send_local, -1))
        # ids (exact in float32 below 2^24) and weights travel together in one message.
        send_meta = torch.cat([send_local.float(), topk_weights[token_idx].float()], dim=1)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group.group)
        in_splits, out_splits = send_counts.tolist(), recv_counts.tolist()
        n = sum(out_splits)
        recv_hidden = hidden.new_empty((n, hidden.shape[1]))
        dist.all_to_all_single(recv_hidden, hidden[token_idx].contiguous(), out_splits, in_splits,
                               group=self.group.group)
        recv_meta = send_meta.new_empty((n, 2 * k))
        dist.all_to_all_single(recv_meta, send_meta, out_splits, in_splits, group=self.group.group)
        return Dispatched(recv_hidden, recv_meta[:, :k].long(), recv_meta[:, k:].contiguous(),
                          (token_idx, in_splits, out_splits, t))

    def combine(self, partial: torch.Tensor, handle) -> torch.Tensor:
        token_idx, in_splits, out_splits, t = handle
        back = partial.new_empty((sum(in_splits), partial.shape[1]))
        dist.all_to_all_single(back, partial.contiguous(), in_splits, out_splits, group=self.group.group)
        out = torch.zeros((t, partial.shape[1]), dtype=torch.float32, device=partial.device)
        out.index_add_(0, token_idx, back.float())
        return out.to(partial.dtype)


def deepep_module():
    """The importable DeepEP-API module (`deep_ep`, else `nixl_ep`), or None."""
    for name in ("deep_ep", "nixl_ep"):
        try:
            return importlib.import_module(name)
        except Exception:  # ImportError, or a wheel built for another torch/CUDA (OSError, RuntimeError)
            continue
    return None


class DeepEPAllToAll:
    """DeepEP `Buffer` dispatch/combine. `mode`: normal (prefill) or low_latency (decode)."""

    graph_safe = True

    def __init__(self, group: EPGroup, slots_per_rank: int, hidden_size: int, mode: str = "normal",
                 max_tokens_per_rank: int = 256, module=None):
        module = module or deepep_module()
        if module is None:
            raise RuntimeError("the DeepEP API is not importable (neither deep_ep nor nixl_ep)")
        self.module, self.group, self.slots_per_rank, self.mode = module, group, slots_per_rank, mode
        self.name = f"{module.__name__.split('.')[0]}:{mode}"
        self.graph_safe = mode == "low_latency"
        self.max_tokens = max_tokens_per_rank
        self.num_slots = slots_per_rank * group.size
        low_latency = mode == "low_latency"
        buffer_cls = module.Buffer
        rdma = 0
        if low_latency:
            hint = getattr(buffer_cls, "get_low_latency_rdma_size_hint", None) or buffer_cls.get_rdma_size_hint
            rdma = hint(max_tokens_per_rank, hidden_size, group.size, self.num_slots)
        nvl = 0 if low_latency else 1 << 30
        params = inspect.signature(buffer_cls.__init__).parameters
        if "group" in params and "rank" in params:  # nixl_ep: buffers sized and ranks connected explicitly
            self.buffer = buffer_cls(rank=group.rank, low_latency_mode=low_latency, group=group.group)
            self.buffer.update_memory_buffers(group.size, slots_per_rank, rdma, nvl)
            self.buffer.connect_ranks(list(range(group.size)))
            self._dispatch, self._combine = self.buffer.ht_dispatch, self.buffer.ht_combine
        else:  # deep_ep
            kwargs = {"low_latency_mode": True, "num_qps_per_rank": slots_per_rank} if low_latency else {}
            self.buffer = buffer_cls(group.group, nvl, rdma, **kwargs)
            self._dispatch, self._combine = self.buffer.dispatch, self.buffer.combine

    def dispatch(self, hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor) -> Dispatched:
        idx = slot_ids.to(getattr(self.module, "topk_idx_t", torch.int64))
        if self.mode == "low_latency":
            recv, recv_count, handle, _, _ = self.buffer.low_latency_dispatch(
                hidden, idx, self.max_tokens, self.num_slots, use_fp8=False)
            local_experts, rows, h = recv.shape
            filled = torch.arange(rows, device=recv.device).unsqueeze(0) < recv_count.unsqueeze(1)
            expert = torch.arange(local_experts, device=recv.device).unsqueeze(1).expand(-1, rows)
            ids = torch.where(filled, expert, torch.full_like(expert, -1)).reshape(-1, 1)
            ones = torch.ones(ids.shape, dtype=torch.float32, device=recv.device)
            return Dispatched(recv.view(-1, h), ids, ones, (handle, idx, topk_weights.float(), local_experts, rows))
        per_rank, per_rdma, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(idx, self.num_slots)
        recv, recv_idx, recv_weights, _, handle, _ = self._dispatch(
            hidden, topk_idx=idx, topk_weights=topk_weights.float(), num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        return Dispatched(recv, recv_idx.long(), recv_weights, handle)

    def combine(self, partial: torch.Tensor, handle) -> torch.Tensor:
        if self.mode == "low_latency":
            inner, idx, weights, local_experts, rows = handle
            # Rows carry weight 1 (set at dispatch); the low-latency combine applies the routing weights.
            out, _, _ = self.buffer.low_latency_combine(partial.view(local_experts, rows, -1), idx, weights, inner)
            return out
        out, _, _ = self._combine(partial, handle)
        return out
