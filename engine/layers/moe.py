"""Mixture-of-experts: routing (which experts each token goes to, with what weight) and the
expert computation over stacked expert weights.

Routing (`router_logits` in float32, then `select_experts`: softmax top-k, group-limited softmax,
DeepSeek-V3's grouped sigmoid with correction bias) is defined in `engine/kernels/moe_routing_ref.py`,
with Triton kernels chosen on CUDA by `fused_ops.py`; it is re-exported here.

Experts are stored stacked, `w13 [E, 2I, H]` (gate rows then up rows) and `w2 [E, H, I]`, the
layout the fused kernels and expert-parallel weight moves use. The expert computation runs the
Triton fused-MoE kernel on CUDA when available, else a CUDA-graph-safe torch path (gathered
per-slot weights for small batches, all experts batched for large ones), and the torch reference
on CPU. Expert ids outside `[0, E)` contribute nothing (experts owned by another EP rank).
Built under an FP8 build scope, the stacks are FP8 with block scales `w13_scale_inv` /
`w2_scale_inv` (engine/quantization.py) and run engine/layers/fp8_linear.py's `fp8_experts`;
EPLB moves a slot's weights and scales together, packed as bytes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ConfigError, ParallelConfig
from engine.eplb import initial_slot_experts
from engine.forward_batch import ForwardBatch
from engine.kernels.fused_moe_ref import fused_experts_ref
from engine.layers.fp8_linear import fp8_experts
from engine.layers.fp8_weights import fp8_parameters
from engine.layers.fused_ops import router_logits, select_experts  # noqa: F401 (routing lives in fused_ops / kernels)
from engine.layers.weights import WeightError, WeightTable, dummy_generator, load_rows
from engine.quantization import build_quantization, fill_dummy_fp8


def fused_experts_torch(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, shared_output: torch.Tensor | None = None) -> torch.Tensor:
    """Capture-safe torch expert computation (no host sync; shapes depend only on T)."""
    out = _experts_torch(hidden, w13, w2, topk_weights, topk_ids)
    return out if shared_output is None else out + shared_output


def _experts_torch(hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    t, k = topk_ids.shape
    num_experts = w13.shape[0]
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    ids = topk_ids.long().clamp(0, num_experts - 1)
    wts = (topk_weights.float() * valid).to(hidden.dtype)
    if t * k <= num_experts:  # small batch: gather the selected experts, one batched GEMM per slot
        x = hidden.repeat_interleave(k, dim=0).unsqueeze(1)  # [T*k, 1, H]
        gate_up = torch.bmm(x, w13[ids.view(-1)].transpose(1, 2))  # [T*k, 1, 2I]
        act = _silu_mul(gate_up)
        y = torch.bmm(act, w2[ids.view(-1)].transpose(1, 2)).view(t, k, -1)  # [T, k, H]
        return (y * wts.unsqueeze(-1)).sum(dim=1)
    # large batch: every expert over every token, combined with a dense routing matrix
    dense = torch.zeros(t, num_experts, dtype=hidden.dtype, device=hidden.device).scatter_add_(1, ids, wts)
    x = hidden.unsqueeze(0).expand(num_experts, -1, -1)
    act = _silu_mul(torch.bmm(x, w13.transpose(1, 2)))  # [E, T, I]
    y = torch.bmm(act, w2.transpose(1, 2))  # [E, T, H]
    return torch.einsum("eth,te->th", y, dense)


def count_expert_tokens(load: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """Add each routed (token, expert) pair into `load [E]` (EPLB's per-layer counts); ids outside
    `[0, E)` (masked routes) count nothing. Device ops only, no host sync."""
    num_experts = load.shape[0]
    ids = topk_ids.reshape(-1).long()
    ok = (ids >= 0) & (ids < num_experts)
    load.scatter_add_(0, ids.clamp(0, num_experts - 1), ok.to(load.dtype))


def _silu_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _gpu_fused_experts():
    try:
        from engine.kernels.fused_moe import fused_experts
        return fused_experts
    except ImportError:
        return None


class FusedMoE(nn.Module):
    """Routed experts of one MoE layer (routing is the caller's: see `select_experts`)."""

    needs_batch = True

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, layer_id: int,
                 parallel: ParallelConfig | None = None):
        super().__init__()
        self.num_experts, self.top_k, self.layer_id = num_experts, top_k, layer_id
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.parallel = parallel or ParallelConfig()
        ep_size, ep_rank = self.parallel.ep_size, self.parallel.ep_rank
        # Physical slots: the logical experts plus redundant replicas, split evenly over EP ranks.
        self.num_slots = num_experts + (self.parallel.num_redundant_experts if ep_size > 1 else 0)
        if self.num_slots % ep_size:
            raise ConfigError(f"layer {layer_id}: {num_experts} experts + {self.num_slots - num_experts} redundant "
                              f"do not split evenly over ep_size={ep_size} ranks")
        self.num_local_slots = self.num_slots // ep_size
        first = ep_rank * self.num_local_slots
        self.slot_experts = initial_slot_experts(num_experts, self.num_slots)[first: first + self.num_local_slots]
        self.quant = build_quantization()
        self.compute_dtype = torch.get_default_dtype()
        if self.quant is None:
            self.w13 = nn.Parameter(torch.empty(self.num_local_slots, 2 * intermediate_size, hidden_size))
            self.w2 = nn.Parameter(torch.empty(self.num_local_slots, hidden_size, intermediate_size))
        else:
            s = self.num_local_slots
            self.w13, self.w13_scale_inv = fp8_parameters(self.quant, 2 * intermediate_size, hidden_size, s)
            self.w2, self.w2_scale_inv = fp8_parameters(self.quant, hidden_size, intermediate_size, s)
        self._kernel = None
        self.ep = None  # engine.ep.runtime.ExpertParallel once bound (ep_size > 1)

    def bind_ep(self, ep) -> None:
        self.ep = ep

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                batch: ForwardBatch | None = None, shared: nn.Module | None = None) -> torch.Tensor:
        """Routed experts' weighted sum `[T, H]`, plus the output of `shared` (the shared experts'
        `GatedMLP`, added after the routed sum is rounded) when given: locally the kernels add it in
        their combine, and at decode sizes compute it inside their two kernels."""
        if batch is not None and batch.expert_load is not None:
            count_expert_tokens(batch.expert_load[self.layer_id], topk_ids)
        if self.ep is None:
            return self._experts(hidden, topk_weights, topk_ids, shared)
        out = self.ep.moe_forward(self, hidden, topk_weights, topk_ids)  # engine/ep/runtime.py
        return out if shared is None else out + shared(hidden)

    def idle_forward(self) -> None:
        """Join this layer's dispatch/combine with no tokens of our own (idle EP rank)."""
        p = self.w13
        empty = torch.empty((0, self.hidden_size), dtype=self.compute_dtype, device=p.device)
        self.forward(empty, torch.empty((0, self.top_k), dtype=torch.float32, device=p.device),
                     torch.empty((0, self.top_k), dtype=torch.int32, device=p.device))

    def _experts(self, hidden, topk_weights, topk_ids, shared: nn.Module | None = None) -> torch.Tensor:
        if hidden.shape[0] == 0:
            return hidden.new_zeros(hidden.shape)
        if self.quant is not None:
            return fp8_experts(hidden, self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv, topk_weights,
                               topk_ids, self.quant, shared)
        if hidden.device.type != "cuda":
            return fused_experts_ref(hidden, self.w13, self.w2, topk_weights, topk_ids,
                                     shared_output=None if shared is None else shared(hidden))
        if self._kernel is None:
            self._kernel = _gpu_fused_experts() or fused_experts_torch
        weights = shared.plain_weights() if shared is not None else None
        if weights is not None and self._kernel is not fused_experts_torch:  # the Triton kernels take them
            return self._kernel(hidden, self.w13, self.w2, topk_weights, topk_ids, shared_weights=weights)
        return self._kernel(hidden, self.w13, self.w2, topk_weights, topk_ids,
                            None if shared is None else shared(hidden))

    # ---------------------------------------------------------------- EPLB weight moves
    def _slot_parts(self) -> list[nn.Parameter]:
        if self.quant is None:
            return [self.w13, self.w2]
        return [self.w13, self.w2, self.w13_scale_inv, self.w2_scale_inv]

    def _packed_dtype(self) -> torch.dtype:
        return self.w13.dtype if self.quant is None else torch.uint8  # FP8 + float32 scales: as bytes

    def pack_slot(self, slot: int) -> torch.Tensor:
        """One local slot's weights (and scales) as one flat tensor (a copy: safe to send while slots
        change)."""
        return torch.cat([p.data[slot].reshape(-1).view(self._packed_dtype()) for p in self._slot_parts()])

    def packed_numel(self) -> int:
        size = torch.empty((), dtype=self._packed_dtype()).element_size()
        return sum(p[0].numel() * p.element_size() // size for p in self._slot_parts())

    def empty_packed(self) -> torch.Tensor:
        return torch.empty(self.packed_numel(), dtype=self._packed_dtype(), device=self.w13.device)

    def unpack_slot(self, slot: int, packed: torch.Tensor) -> None:
        offset = 0
        for p in self._slot_parts():
            n = p[0].numel() * p.element_size() // packed.element_size()
            p.data[slot].copy_(packed[offset: offset + n].view(p.dtype).view_as(p.data[slot]))
            offset += n

    def dummy_fill(self, seed: int, std: float, prefix: str) -> None:
        """Random weights that depend on (seed, logical expert) only, so every replica of an expert,
        on any rank and for any EP size, holds the same values."""
        for slot, e in enumerate(self.slot_experts):
            for param, part in ((self.w13, "w13"), (self.w2, "w2")):
                gen = dummy_generator(seed, f"{prefix}.{e}.{part}", param.device)
                if self.quant is not None:
                    fill_dummy_fp8(param.data[slot], param.block_scale.data[slot], gen, std)
                    continue
                with torch.no_grad():
                    param.data[slot].copy_(std * torch.randn(param.shape[1:], generator=gen, device=param.device))

    def register_weights(self, table: WeightTable, prefix: str) -> None:
        """Per-expert checkpoint names, plus transformers-5's fused in-memory tensors as aliases.
        With EP, an expert held by no local slot is accepted and skipped; one held by several local
        slots (redundant replicas) is copied into each."""
        inter = self.intermediate_size
        for e in range(self.num_experts):
            local = [s for s, x in enumerate(self.slot_experts) if x == e]
            optional = not local
            table.add(f"{prefix}.{e}.gate_proj.weight", self._into(self.w13, local, 0, inter),
                      slots=[(prefix, e, "g")], optional=optional)
            table.add(f"{prefix}.{e}.up_proj.weight", self._into(self.w13, local, inter, inter),
                      slots=[(prefix, e, "u")], optional=optional)
            table.add(f"{prefix}.{e}.down_proj.weight", self._into(self.w2, local, 0, None),
                      slots=[(prefix, e, "d")], optional=optional)
        every = range(self.num_experts)
        experts = torch.tensor(self.slot_experts, dtype=torch.long)

        def fused(param):
            def load(t: torch.Tensor, name: str) -> None:
                if t.shape[0] != self.num_experts:
                    raise WeightError(f"tensor {name!r}: expected {self.num_experts} experts, got {t.shape[0]}")
                load_rows(param, t[experts.to(t.device)], name)
            return load
        table.alias(f"{prefix}.gate_up_proj", fused(self.w13), [(prefix, e, s) for e in every for s in ("g", "u")])
        table.alias(f"{prefix}.down_proj", fused(self.w2), [(prefix, e, "d") for e in every])

    @staticmethod
    def _into(param: nn.Parameter, slots: list[int], start: int, size: int | None):
        def load(t: torch.Tensor, name: str) -> None:
            for slot in slots:
                load_rows(param, t, name, start, size, slot)
        return load
