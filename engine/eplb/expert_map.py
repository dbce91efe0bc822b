"""The live logical->physical expert map of one EP group, and the weight moves a new one needs.

Owns the device tensors MoE layers read to turn routed logical experts into physical slots,
and which slots each EP rank holds. The tensors have fixed shapes and are updated in place, so
CUDA graphs captured against them stay valid across rebalances. It must not move weights or
talk to other ranks: `swap` returns the plan, the EP layer carries it out (between steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.eplb.algorithm import ExpertPlacement


@dataclass(frozen=True)
class WeightMove:
    """Slot `slot` of `layer` must hold `new_expert` instead of `old_expert`; copy its weights
    from `src_slot`, a slot that holds `new_expert` under the *old* placement (on the
    destination's own rank when one exists). Read every source before writing any destination:
    a source slot may itself be rewritten in the same swap."""

    layer: int
    slot: int
    old_expert: int
    new_expert: int
    src_slot: int
    dst_rank: int
    src_rank: int


class ExpertMap:
    def __init__(self, placement: ExpertPlacement, device: torch.device | str = "cpu",
                 max_replicas: int | None = None):
        num_layers, num_experts = placement.replica_count.shape
        num_slots = placement.num_physical_experts
        # Worst case: every redundant slot replicates one expert. Fixed so swaps never reshape.
        self.max_replicas = max_replicas or num_slots - num_experts + 1
        self.placement = placement
        self.physical_to_logical = torch.zeros((num_layers, num_slots), dtype=torch.long, device=device)
        self.logical_to_physical = torch.full((num_layers, num_experts, self.max_replicas), -1,
                                              dtype=torch.long, device=device)
        self.replica_count = torch.ones((num_layers, num_experts), dtype=torch.long, device=device)
        self._write(placement)

    @property
    def num_ranks(self) -> int:
        return self.placement.num_gpus

    def route(self, layer: int, topk_ids: torch.Tensor, replica_offset: int = 0) -> torch.Tensor:
        """Physical slot for each routed (token, logical expert); same shape as topk_ids.

        Token t uses replica (t + replica_offset) % replicas, so a batch spreads an expert's tokens
        evenly over its replicas; give each EP rank its own offset so small decode batches on
        different ranks do not all pick replica 0. Negative ids (masked routes) stay -1.
        Device-only, fixed shapes: safe under CUDA graphs."""
        ids = topk_ids.long()
        valid = ids >= 0
        ids = ids.clamp_min(0)
        counts = self.replica_count[layer][ids]
        token = torch.arange(ids.shape[0], device=ids.device).view(-1, *([1] * (ids.dim() - 1)))
        replica = (token + replica_offset) % counts
        physical = self.logical_to_physical[layer][ids, replica]
        return torch.where(valid, physical, torch.full_like(physical, -1))

    def slots_of_rank(self, rank: int) -> range:
        """Physical slots EP rank `rank` holds (the same for every layer)."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"EP rank {rank} outside [0, {self.num_ranks})")
        per_rank = self.placement.slots_per_gpu
        return range(rank * per_rank, (rank + 1) * per_rank)

    def experts_of_rank(self, layer: int, rank: int) -> torch.Tensor:
        """Logical expert held by each of `rank`'s slots in `layer` (host tensor)."""
        slots = self.slots_of_rank(rank)
        return self.placement.physical_to_logical[layer, slots.start:slots.stop]

    def plan_moves(self, new: ExpertPlacement) -> list[WeightMove]:
        """Weight moves that turn the current placement into `new` (no state change)."""
        self._check_compatible(new)
        old_p2l, new_p2l = self.placement.physical_to_logical, new.physical_to_logical
        old_slots = self.placement.logical_to_physical.tolist()  # lists: thousands of lookups
        per_rank = new.slots_per_gpu
        moves = []
        for layer, slot in (old_p2l != new_p2l).nonzero().tolist():
            expert = int(new_p2l[layer, slot])
            sources = [s for s in old_slots[layer][expert] if s >= 0]
            dst_rank = slot // per_rank
            local = [s for s in sources if s // per_rank == dst_rank]
            src = (local or sources)[0]
            moves.append(WeightMove(layer, slot, int(old_p2l[layer, slot]), expert, src, dst_rank,
                                    src // per_rank))
        return moves

    def swap(self, new: ExpertPlacement) -> list[WeightMove]:
        """Make `new` the live placement; returns the moves the ranks must have done before the
        next forward. All checks run before any tensor changes, so a rejected placement leaves
        the map as it was."""
        moves = self.plan_moves(new)
        self._write(new)
        self.placement = new
        return moves

    def _check_compatible(self, new: ExpertPlacement) -> None:
        old = self.placement
        if (new.physical_to_logical.shape != old.physical_to_logical.shape
                or new.replica_count.shape != old.replica_count.shape or new.num_gpus != old.num_gpus):
            raise ValueError(
                f"new placement {tuple(new.physical_to_logical.shape)} slots over {new.num_gpus} GPUs, "
                f"{new.num_logical_experts} experts does not match the live one "
                f"{tuple(old.physical_to_logical.shape)} over {old.num_gpus} GPUs, {old.num_logical_experts}")

    def _write(self, placement: ExpertPlacement) -> None:
        replicas = placement.logical_to_physical.shape[2]
        if replicas > self.max_replicas:
            raise ValueError(f"placement gives an expert {replicas} replicas; this map holds at most "
                             f"{self.max_replicas}")
        # In place: graphs captured against these tensors see the new map.
        self.physical_to_logical.copy_(placement.physical_to_logical)
        self.replica_count.copy_(placement.replica_count)
        self.logical_to_physical.fill_(-1)
        self.logical_to_physical[:, :, :replicas].copy_(placement.logical_to_physical)
