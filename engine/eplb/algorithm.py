"""EPLB rebalancer: from measured per-expert load to a placement of physical expert slots on GPUs.

Owns the pure placement computation (CPU torch, deterministic, no I/O). It must not know about
ranks, processes or weights; applying a placement is `expert_map.ExpertMap`'s job.

Policy (after DeepSeek's EPLB description):
* hierarchical, when expert groups split evenly over nodes: pack whole expert groups onto nodes
  (balanced group load), then inside each node replicate its hottest experts into the node's
  redundant slots, then pack the node's physical experts onto its GPUs;
* global otherwise: replicate over all experts, then pack onto all GPUs.
Every GPU gets the same number of slots. Replication starts from the classic greedy (one more
replica to the expert with the highest load per replica), packing from largest-first into the
least-loaded GPU with room; both are then improved by local search (pairwise swaps between the
heaviest GPU and the others, and moving one replica between experts), because the greedy alone
can miss the optimum by more than 10% when a single expert dominates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Relative gap to the mean GPU load below which a layer is considered balanced.
_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ExpertPlacement:
    """Where every physical expert slot of every MoE layer lives, for one EP group of GPUs.

    Slot p sits on GPU p // slots_per_gpu. A logical expert with c replicas owns c slots; tokens
    routed to it are shared evenly among them.
    """

    physical_to_logical: torch.Tensor  # [L, P] long: logical expert held by each slot
    logical_to_physical: torch.Tensor  # [L, E, max_replicas] long: its slots, -1 padded
    replica_count: torch.Tensor  # [L, E] long, >= 1
    num_gpus: int

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.shape[0]

    @property
    def num_physical_experts(self) -> int:
        return self.physical_to_logical.shape[1]

    @property
    def num_logical_experts(self) -> int:
        return self.replica_count.shape[1]

    @property
    def slots_per_gpu(self) -> int:
        return self.num_physical_experts // self.num_gpus

    @classmethod
    def from_physical_to_logical(cls, physical_to_logical: torch.Tensor, num_logical_experts: int,
                                 num_gpus: int) -> "ExpertPlacement":
        """Derive the inverse map and replica counts; validates the placement."""
        p2l = physical_to_logical.long().cpu()
        num_layers, num_slots = p2l.shape
        if num_slots % num_gpus:
            raise ValueError(f"{num_slots} physical slots do not split evenly over {num_gpus} GPUs")
        if p2l.min() < 0 or p2l.max() >= num_logical_experts:
            raise ValueError(f"physical_to_logical holds ids outside [0, {num_logical_experts})")
        counts = torch.zeros(num_layers, num_logical_experts, dtype=torch.long)
        counts.scatter_add_(1, p2l, torch.ones_like(p2l))
        if (counts == 0).any():
            layer, expert = (counts == 0).nonzero()[0].tolist()
            raise ValueError(f"layer {layer}: logical expert {expert} has no physical slot")
        # Slots of each expert, in slot order: sort by (expert, slot) and number the runs.
        slot = torch.arange(num_slots).expand(num_layers, -1)
        order = torch.argsort(p2l * num_slots + slot, dim=1)
        sorted_expert = p2l.gather(1, order)
        run_start = (counts.cumsum(1) - counts).gather(1, sorted_expert)
        replica = torch.arange(num_slots) - run_start
        max_replicas = int(counts.max())
        l2p = torch.full((num_layers, num_logical_experts * max_replicas), -1, dtype=torch.long)
        l2p.scatter_(1, sorted_expert * max_replicas + replica, order)
        return cls(p2l, l2p.view(num_layers, num_logical_experts, max_replicas), counts, num_gpus)

    def slot_load(self, load: torch.Tensor) -> torch.Tensor:
        """[L, E] expert load -> [L, P] load each slot serves (its expert's load / replicas)."""
        load = load.to(torch.float64).cpu()
        per_replica = load / self.replica_count
        return per_replica.gather(1, self.physical_to_logical)

    def gpu_load(self, load: torch.Tensor) -> torch.Tensor:
        """[L, E] expert load -> [L, num_gpus] load each GPU serves under this placement."""
        return self.slot_load(load).view(self.num_layers, self.num_gpus, self.slots_per_gpu).sum(-1)

    def imbalance(self, load: torch.Tensor) -> torch.Tensor:
        """[L] max / mean GPU load per layer (1.0 = perfect; layers without load count as 1.0)."""
        per_gpu = self.gpu_load(load)
        mean = per_gpu.mean(1)
        return torch.where(mean > 0, per_gpu.max(1).values / mean.clamp_min(1e-30), torch.ones_like(mean))


def initial_slot_experts(num_experts: int, num_slots: int) -> list[int]:
    """Logical expert of each physical slot before any load is known: slot s holds s mod E (the
    first `num_slots - E` experts get a second replica)."""
    return [s % num_experts for s in range(num_slots)]


def initial_placement(num_layers: int, num_experts: int, num_slots: int, num_ranks: int) -> ExpertPlacement:
    p2l = torch.tensor(initial_slot_experts(num_experts, num_slots), dtype=torch.long)
    return ExpertPlacement.from_physical_to_logical(p2l.expand(num_layers, -1).clone(), num_experts, num_ranks)


def rebalance(load: torch.Tensor, num_physical_experts: int, num_gpus: int, num_nodes: int = 1,
              num_groups: int | None = None, search_rounds: int = 3) -> ExpertPlacement:
    """Place `num_physical_experts` slots for the logical experts of every layer.

    load: [num_layers, num_logical_experts] tokens per expert over a window.
    num_groups: expert groups of the router (DeepSeek-V3: 8); enables the hierarchical policy
    when groups split evenly over nodes. search_rounds: rounds of the replica-count local search
    (0 = plain greedy replication).
    """
    if load.dim() != 2:
        raise ValueError(f"load must be [num_layers, num_logical_experts], got shape {tuple(load.shape)}")
    num_layers, num_experts = load.shape
    if num_physical_experts < num_experts:
        raise ValueError(f"{num_physical_experts} physical slots cannot hold {num_experts} logical experts")
    if num_physical_experts % num_gpus or num_gpus % num_nodes:
        raise ValueError(f"need physical slots ({num_physical_experts}) % GPUs ({num_gpus}) == 0 and "
                         f"GPUs % nodes ({num_nodes}) == 0")
    weights = load.detach().to(torch.float64).cpu().clamp_min(0)
    # The tensors here are tiny ([layers, <= a few hundred]); intra-op threads only add
    # synchronisation, which costs 20x on a busy host. Restored on exit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p2l = _place(weights, num_physical_experts, num_gpus, num_nodes, num_groups, search_rounds)
    finally:
        torch.set_num_threads(threads)
    return ExpertPlacement.from_physical_to_logical(p2l, num_experts, num_gpus)


def _place(weights: torch.Tensor, num_physical_experts: int, num_gpus: int, num_nodes: int,
           num_groups: int | None, search_rounds: int) -> torch.Tensor:
    num_experts = weights.shape[1]
    hierarchical = (num_groups is not None and num_nodes > 1 and num_experts % num_groups == 0
                    and num_groups % num_nodes == 0 and num_physical_experts % num_nodes == 0)
    if hierarchical:
        return _hierarchical(weights, num_physical_experts, num_gpus, num_nodes, num_groups, search_rounds)
    return _replicate_and_pack(weights, num_physical_experts, num_gpus, search_rounds)


def _hierarchical(weights: torch.Tensor, num_slots: int, num_gpus: int, num_nodes: int, num_groups: int,
                  search_rounds: int) -> torch.Tensor:
    num_layers, num_experts = weights.shape
    group_size = num_experts // num_groups
    group_load = weights.view(num_layers, num_groups, group_size).sum(-1)
    group_node = pack(group_load, num_nodes)  # [L, num_groups]
    # Logical experts of each node, node-major: sort groups by node, expand groups to experts.
    groups_by_node = torch.argsort(group_node * num_groups + torch.arange(num_groups), dim=1)
    experts_by_node = (groups_by_node.unsqueeze(-1) * group_size + torch.arange(group_size)).view(
        num_layers, num_nodes, num_experts // num_nodes)
    node_weights = weights.gather(1, experts_by_node.view(num_layers, -1)).view(
        num_layers * num_nodes, num_experts // num_nodes)
    local = _replicate_and_pack(node_weights, num_slots // num_nodes, num_gpus // num_nodes, search_rounds)
    # Node k's slots are [k * slots_per_node, (k+1) * slots_per_node): map local ids back.
    return experts_by_node.view(num_layers * num_nodes, -1).gather(1, local).view(num_layers, num_slots)


def _replicate_and_pack(weights: torch.Tensor, num_slots: int, num_packs: int,
                        search_rounds: int) -> torch.Tensor:
    """[B, n] loads -> [B, num_slots] logical id of each slot, slots grouped by pack (GPU)."""
    counts = replicate(weights, num_slots)
    items, pack_of = _pack_replicas(weights, counts, num_packs)
    if num_slots > weights.shape[1] and search_rounds > 0:
        best_max = _max_pack_load(weights, counts, items, pack_of, num_packs)
        # Rows already at the mean cannot improve; search only the others.
        todo = (best_max > weights.sum(1) / num_packs * (1 + _TOLERANCE)).nonzero().flatten()
        if len(todo):
            sub = _search_counts(weights[todo], counts[todo], items[todo], pack_of[todo], best_max[todo],
                                 num_packs, search_rounds)
            items[todo], pack_of[todo] = sub
    # Order slots by pack, then by logical id inside a pack.
    key = pack_of * (weights.shape[1] + 1) + items
    return items.gather(1, torch.argsort(key, dim=1))


def _search_counts(weights, counts, items, pack_of, best_max, num_packs: int, rounds: int):
    """Local search over replica counts: keep a move of one replica between experts when the
    repacked heaviest GPU gets lighter."""
    for _ in range(rounds):
        improved = False
        for cand in _count_candidates(weights, counts):
            cand_items, cand_pack = _pack_replicas(weights, cand, num_packs)
            cand_max = _max_pack_load(weights, cand, cand_items, cand_pack, num_packs)
            better = cand_max < best_max * (1 - 1e-9)
            if better.any():
                improved = True
                sel = better.unsqueeze(1)
                counts = torch.where(sel, cand, counts)
                items = torch.where(sel, cand_items, items)
                pack_of = torch.where(sel, cand_pack, pack_of)
                best_max = torch.where(better, cand_max, best_max)
        if not improved:
            break
    return items, pack_of


def replicate(weights: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[B, n] loads -> [B, n] replica counts summing to num_slots: each extra slot goes to the
    expert with the highest load per replica."""
    batch, n = weights.shape
    counts = torch.ones(batch, n, dtype=torch.long)
    rows = torch.arange(batch)
    # A tiny floor makes ties (an empty window: all zeros) go to the expert with fewer replicas,
    # spreading redundant slots instead of stacking them on expert 0.
    floored = weights + (1e-9 * weights.mean(1, keepdim=True) + 1e-30)
    for _ in range(num_slots - n):
        hottest = (floored / counts).argmax(1)
        counts[rows, hottest] += 1
    return counts


def _count_candidates(weights: torch.Tensor, counts: torch.Tensor, width: int = 2):
    """Replica counts with one replica moved from a cheap donor to a hot receiver, per row."""
    per_replica = weights / counts
    # Donor cost: load per replica after losing one; only experts with >= 2 replicas can give.
    donor_cost = (weights / (counts - 1).clamp_min(1)).masked_fill(counts < 2, float("inf"))
    donors = torch.argsort(donor_cost, dim=1)[:, :width]
    receivers = torch.argsort(per_replica, dim=1, descending=True)[:, :width + 1]
    rows = torch.arange(counts.shape[0])
    for d in range(donors.shape[1]):
        donor = donors[:, d]
        valid_donor = counts[rows, donor] >= 2
        for r in range(receivers.shape[1]):
            receiver = receivers[:, r]
            ok = valid_donor & (receiver != donor)
            if not ok.any():
                continue
            cand = counts.clone()
            cand[rows[ok], donor[ok]] -= 1
            cand[rows[ok], receiver[ok]] += 1
            yield cand


def _pack_replicas(weights: torch.Tensor, counts: torch.Tensor, num_packs: int):
    """Expand counts into replica items and pack them; returns (item logical ids, item pack)."""
    num_slots = int(counts[0].sum())
    ends = counts.cumsum(1)
    items = torch.searchsorted(ends, torch.arange(num_slots).expand(counts.shape[0], -1).contiguous(),
                               right=True)
    item_weight = (weights / counts).gather(1, items)
    return items, pack(item_weight, num_packs)


def _max_pack_load(weights, counts, items, pack_of, num_packs) -> torch.Tensor:
    item_weight = (weights / counts).gather(1, items)
    load = torch.zeros(weights.shape[0], num_packs, dtype=weights.dtype)
    return load.scatter_add_(1, pack_of, item_weight).max(1).values


def pack(weights: torch.Tensor, num_packs: int, max_swap_rounds: int = 256) -> torch.Tensor:
    """[B, n] item weights -> [B, n] pack index; every pack gets n / num_packs items.

    Largest-first into the least-loaded pack with room, then pairwise swaps that lower the
    heaviest pack until none helps."""
    batch, n = weights.shape
    if n % num_packs:
        raise ValueError(f"{n} items do not split evenly into {num_packs} packs")
    capacity = n // num_packs
    rows = torch.arange(batch)
    order = torch.argsort(weights, dim=1, descending=True, stable=True)
    pack_of = torch.empty(batch, n, dtype=torch.long)
    load = torch.zeros(batch, num_packs, dtype=weights.dtype)
    fill = torch.zeros(batch, num_packs, dtype=torch.long)
    for pos in range(n):
        item = order[:, pos]
        target = load.masked_fill(fill >= capacity, float("inf")).argmin(1)
        pack_of[rows, item] = target
        load[rows, target] += weights[rows, item]
        fill[rows, target] += 1
    if num_packs > 1 and capacity > 0:
        _improve_by_swaps(weights, pack_of, load, capacity, max_swap_rounds)
    return pack_of


def _improve_by_swaps(weights, pack_of, load, capacity: int, max_rounds: int) -> None:
    """Swap one item of the heaviest pack with one item elsewhere while that lowers both below
    the heaviest pack's load (each accepted swap makes the sorted load vector strictly smaller,
    so this ends). Rows within _TOLERANCE of their mean pack load stop early. In place."""
    n = weights.shape[1]
    mean = load.sum(1) / load.shape[1]
    active = torch.arange(weights.shape[0])
    for _ in range(max_rounds):
        w, owner, pack_load = weights[active], pack_of[active], load[active]
        heaviest_load, heaviest = pack_load.max(1)
        in_heaviest = owner == heaviest.unsqueeze(1)
        a_items = torch.argsort((~in_heaviest).to(torch.int8), dim=1, stable=True)[:, :capacity]
        wa = w.gather(1, a_items).unsqueeze(2)  # [B, cap, 1]
        wb = w.unsqueeze(1)  # [B, 1, n]
        other_load = pack_load.gather(1, owner).unsqueeze(1)
        after = torch.maximum(heaviest_load.view(-1, 1, 1) - wa + wb, other_load - wb + wa)
        after = after.masked_fill(in_heaviest.unsqueeze(1), float("inf"))
        best, flat = after.view(len(active), -1).min(1)
        ok = (best < heaviest_load * (1 - 1e-12)) & (heaviest_load > mean[active] * (1 + _TOLERANCE))
        if not ok.any():
            return
        r = active[ok]
        a = a_items[ok, flat[ok] // n]
        b = flat[ok] % n
        pa, pb = pack_of[r, a], pack_of[r, b]
        delta = weights[r, b] - weights[r, a]
        load[r, pa] += delta
        load[r, pb] -= delta
        pack_of[r, a], pack_of[r, b] = pb, pa
        active = r
