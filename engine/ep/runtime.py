"""The expert-parallel runtime of one engine rank: binds the model's MoE layers to the EP group,
the token all-to-all and the live expert map, keeps ranks in lock-step, and applies EPLB.

Lock-step: attention is data-parallel (each rank schedules its own requests), but every MoE
layer is a collective. Each engine-loop iteration every rank calls `step_begin(has_work, ...,
chunks)`; if any rank has work, all run one forward — ranks without requests run `run_idle()`
(or replay the step's decode graph with no real rows), so they still serve the others'
dispatches. `step_begin` also agrees the step's dispatch plan (`step_plan.py`): the capacity
every rank's fixed-size dispatches use, and so the CUDA-graph bucket every rank replays.

EPLB: MoE layers add their routed logical experts into the load recorder; every
`eplb_interval` steps (once the window is full) the ranks sum their windows, compute the same
placement (`engine.eplb.rebalance` is deterministic), and — between two steps, before any
rank's next forward — exchange the expert weights the new placement needs and swap the map in
place. Requests in flight see one consistent placement per step and are never dropped.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from engine.config import ParallelConfig
from engine.ep.all_to_all import DeepEPAllToAll, TorchAllToAll, deepep_module
from engine.ep.fixed_all_to_all import FixedCapacityAllToAll
from engine.ep.group import EPGroup
from engine.ep.step_plan import StepPlan, mask_padding, plan_step, run_pipelined
from engine.ep.two_batch import Baton
from engine.eplb import ExpertLoadRecorder, ExpertMap, ExpertPlacement, WeightMove, initial_placement, rebalance

log = logging.getLogger(__name__)

IMBALANCE_EVERY = 64  # steps between group-wide load sums for the imbalance metric


def select_all_to_all(kind: str, group: EPGroup, slots_per_rank: int, hidden_size: int, mode: str = "normal",
                      max_tokens_per_rank: int = 256, fp8: bool = False, fp8_group: int = 128, top_k: int = 8,
                      dtype: torch.dtype = torch.bfloat16):
    """`kind`: auto (DeepEP API on CUDA when importable, else fixed) | fixed | symm (the fixed rows
    over symmetric memory, CUDA) | torch | deepep. `mode` picks DeepEP's kernels: normal
    (prefill-sized batches) or low_latency (decode, CUDA-graph safe). `fp8`: the fixed/symm paths
    send activations as FP8 with per-`fp8_group`-column scales."""
    if kind not in ("auto", "fixed", "symm", "torch", "deepep"):
        raise ValueError(f"unknown EP all-to-all backend {kind!r} (auto | fixed | symm | torch | deepep)")
    if fp8 and kind not in ("auto", "fixed", "symm"):
        raise ValueError(f"FP8 dispatch is implemented by the fixed-capacity all-to-alls, not {kind!r}")
    if kind == "symm":
        from engine.ep.symm_all_to_all import SymmetricMemoryAllToAll
        backend = SymmetricMemoryAllToAll(group, slots_per_rank, hidden_size, top_k, max_tokens_per_rank, dtype, fp8,
                                          fp8_group)
    elif kind == "torch":
        backend = TorchAllToAll(group, slots_per_rank)
    elif kind == "fixed" or fp8 or (kind == "auto" and (group.device.type != "cuda" or deepep_module() is None)):
        backend = FixedCapacityAllToAll(group, slots_per_rank, fp8=fp8, fp8_group=fp8_group)
    else:
        if group.device.type != "cuda":
            raise ValueError("the DeepEP all-to-all needs CUDA devices")
        backend = DeepEPAllToAll(group, slots_per_rank, hidden_size, mode, max_tokens_per_rank)
    log.info("EP all-to-all backend: %s (rank %d of %d)", backend.name, group.rank, group.size)
    return backend


def _activation_group(moe) -> int:
    """Columns per FP8 dispatch scale: the FP8 experts' own activation block when they quantize
    activations (so their quantization of the received rows is exact), else DeepSeek-V3's 128."""
    quant = moe.quant
    return quant.block_size[1] if quant is not None and quant.quantize_activations else 128


class ExpertParallel:
    def __init__(self, parallel: ParallelConfig, model: torch.nn.Module, device: torch.device, hidden_size: int,
                 mode: str = "normal", max_tokens_per_rank: int = 256):
        from engine.layers.moe import FusedMoE

        self.parallel = parallel
        self.moe_layers: dict[int, FusedMoE] = {m.layer_id: m for m in model.modules() if isinstance(m, FusedMoE)}
        if not self.moe_layers:
            raise ValueError(f"--ep-size {parallel.ep_size}: the model has no MoE layers to split across ranks")
        first = next(iter(self.moe_layers.values()))
        self.num_experts, self.num_slots = first.num_experts, first.num_slots
        self.slots_per_rank = first.num_local_slots
        self.num_layers = max(self.moe_layers) + 1
        self.group = EPGroup(parallel.ep_rank, parallel.ep_size, parallel.dist_init_method, device)
        self.rank = self.group.rank
        # Decode nodes use DeepEP's low-latency kernels (fixed buffers, one slot per sequence a step holds).
        self.all_to_all = select_all_to_all(parallel.ep_backend, self.group, self.slots_per_rank, hidden_size, mode,
                                            max_tokens_per_rank, fp8=parallel.ep_dispatch_fp8,
                                            fp8_group=_activation_group(first), top_k=first.top_k,
                                            dtype=first.compute_dtype)
        self.baton: Baton | None = None  # set while a two-batch step runs (engine/ep/two_batch.py)
        placement = initial_placement(self.num_layers, self.num_experts, self.num_slots, parallel.ep_size)
        self.expert_map = ExpertMap(placement, device)
        self.recorder = ExpertLoadRecorder(self.num_layers, self.num_experts, max(1, parallel.eplb_window), device)
        self.total_load = torch.zeros((self.num_layers, self.num_experts), dtype=torch.int64, device=device)
        self.num_steps = 0
        # Expert load of the whole group over the last window, summed across ranks every
        # IMBALANCE_EVERY steps (and at every rebalance): what `ep_imbalance` reports.
        self.global_window = torch.zeros((self.num_layers, self.num_experts))
        self.num_rebalances = 0
        self.num_weight_moves = 0
        self.num_two_batch_steps = 0  # forwards (busy or idle) run as two interleaved micro-batches
        # This step's dispatch plan (None outside a step: then each forward plans for its own
        # token count, which is right only when every rank runs the same count, as at profiling).
        self.plan: StepPlan | None = None
        self.graph_buckets: tuple[int, ...] = ()  # decode CUDA-graph batch sizes, once captured
        self.num_real_tokens = torch.zeros((), dtype=torch.long, device=device)  # rows a graph replay computes
        for m in self.moe_layers.values():
            m.bind_ep(self)

    @property
    def backend_name(self) -> str:
        return self.all_to_all.name

    # ------------------------------------------------------------- per step
    def step_begin(self, has_work: bool, stop: bool = False, chunks=()) -> tuple[bool, bool]:
        """Collective: (any rank has work — then every rank runs a forward, any rank stops). Also
        fixes this step's dispatch plan from the most tokens any rank's `chunks` hold."""
        busy, stop, max_tokens = self.group.agree(has_work, stop, sum(c.num_new_tokens for c in chunks))
        self.plan = plan_step(max(1, max_tokens), self.parallel.ep_dispatch_capacity,
                              self.parallel.ep_overlap_min_tokens, self.graph_buckets,
                              self._two_batch_min_tokens()) if busy else None
        return busy, stop

    def _two_batch_min_tokens(self) -> int:
        # Two-batch overlap across whole layers needs start/finish collectives (the fixed path).
        fixed = isinstance(self.all_to_all, FixedCapacityAllToAll)
        return self.parallel.ep_two_batch_min_tokens if fixed else 0

    @property
    def two_batch(self) -> bool:
        """This step runs as two interleaved micro-batches on every rank (engine/ep/two_batch.py)."""
        return self.plan is not None and self.plan.two_batch

    def run_two_batches(self, first, second) -> tuple:
        """Run two micro-batch forwards interleaved at their collectives (both must visit every MoE
        layer: a micro-batch without tokens calls `run_idle`)."""
        self.baton = Baton()
        self.num_two_batch_steps += 1
        try:
            return self.baton.run(first, second)
        finally:
            self.baton = None

    @property
    def graph_bucket(self) -> int | None:
        """The decode graph size every rank replays this step (None: this step runs eagerly)."""
        plan = self.plan
        return plan.capacity if plan is not None and plan.bucket and self.all_to_all.graph_safe else None

    def prepare_replay(self, num_real_tokens: int) -> None:
        """Before a graph replay: how many of the bucket's rows are real (the rest route nowhere)."""
        self.num_real_tokens.fill_(num_real_tokens)

    def capture_plan(self, bucket: int) -> None:
        """Set while the decode graph of `bucket` rows is captured (its padding rows are masked)."""
        self.plan = StepPlan(bucket, 1, bucket=True, padded=True)

    def graphs_captured(self, buckets: list[int]) -> None:
        """Decode graphs of these sizes exist on every rank (same config): steps that fit one use it."""
        self.plan, self.graph_buckets = None, tuple(sorted(buckets))

    def moe_forward(self, layer, hidden: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
        """One MoE layer across the ranks: logical experts -> physical slots (spread over replicas),
        tokens to the slots' ranks, the layer's local grouped GEMM, partial sums back and added."""
        from engine.layers.moe import count_expert_tokens

        plan = self.plan or plan_step(hidden.shape[0], self.parallel.ep_dispatch_capacity,
                                      self.parallel.ep_overlap_min_tokens)
        if plan.padded:
            topk_ids = mask_padding(topk_ids, self.num_real_tokens)
        count_expert_tokens(self.recorder.step_load[layer.layer_id], topk_ids)
        slots = self.expert_map.route(layer.layer_id, topk_ids, replica_offset=self.rank)
        a2a = self.all_to_all
        if isinstance(a2a, FixedCapacityAllToAll):  # planned, pipelined micro-batches
            return run_pipelined(a2a.for_plan(plan), layer._experts, hidden, slots, topk_weights, plan,
                                 self.baton.switch if self.baton is not None else None)
        sent = a2a.dispatch(hidden, slots, topk_weights)  # count-based backends size themselves
        return a2a.combine(layer._experts(sent.hidden, sent.topk_weights, sent.topk_ids), sent.handle)

    @torch.inference_mode()
    def run_idle(self) -> None:
        """This rank has no tokens: still take part in every MoE layer's dispatch and combine (twice
        per layer in a two-batch step, interleaved as the busy ranks' micro-batches are)."""
        if self.two_batch and self.baton is None:
            self.run_two_batches(self.run_idle, self.run_idle)
            return
        for layer_id in sorted(self.moe_layers):
            self.moe_layers[layer_id].idle_forward()

    def step_end(self) -> None:
        self.plan = None
        self.total_load += self.recorder.step_load
        self.recorder.end_step()
        self.num_steps += 1
        interval = self.parallel.eplb_interval
        if interval > 0 and self.num_steps % interval == 0 and self.recorder.window_full:
            self.rebalance()
        elif self.num_steps % IMBALANCE_EVERY == 0:  # the group's load, for the ep_imbalance metric
            self.global_window = self.group.sum_(self.recorder.window_load().clone()).cpu()

    # ------------------------------------------------------------- EPLB
    @torch.inference_mode()
    def rebalance(self) -> list[WeightMove]:
        """Collective: sum the load windows, place, move weights, swap the map (between steps)."""
        load = self.recorder.window_load().to(torch.float64).cpu()
        self.group.sum_(load)
        self.global_window = load.float()
        layers = sorted(self.moe_layers)
        # Dense layers have no load; give them a uniform one so the placement stays valid there.
        full = torch.ones((self.num_layers, self.num_experts), dtype=torch.float64)
        full[layers] = load[layers]
        proposed = rebalance(full, self.num_slots, self.group.size)
        # Keep a layer's placement unless the new one lowers its max/mean GPU load by at least
        # `eplb_min_gain`: a fresh placement reshuffles nearly every slot, and moving experts to
        # gain a fraction of a percent costs more than it saves.
        before = self.expert_map.placement.imbalance(full)
        after = proposed.imbalance(full)
        improve = torch.zeros(self.num_layers, dtype=torch.bool)
        improve[layers] = (before[layers] - after[layers]) > self.parallel.eplb_min_gain * before[layers]
        if not bool(improve.any()):
            log.info("EPLB on rank %d: placement kept (max imbalance %.3f; no layer gains %.0f%%)", self.rank,
                     float(before[layers].max()), 100 * self.parallel.eplb_min_gain)
            return []
        old_p2l = self.expert_map.placement.physical_to_logical
        p2l = torch.where(improve.unsqueeze(1), proposed.physical_to_logical, old_p2l)
        placement = ExpertPlacement.from_physical_to_logical(p2l, self.num_experts, self.group.size)
        moves = [m for m in self.expert_map.plan_moves(placement) if m.layer in self.moe_layers]
        self._move_weights(moves)
        self.expert_map.swap(placement)
        for layer_id, moe in self.moe_layers.items():
            moe.slot_experts = self.expert_map.experts_of_rank(layer_id, self.rank).tolist()
        self.num_rebalances += 1
        self.num_weight_moves += len(moves)
        log.info("EPLB rebalance %d on rank %d: %d layer(s), %d slot(s) moved; max imbalance %.3f -> %.3f",
                 self.num_rebalances, self.rank, int(improve.sum()), len(moves), float(before[layers].max()),
                 float(placement.imbalance(full)[layers].max()))
        return moves

    def rebalance_workspace_bytes(self) -> int:
        """Device memory one layer's weight moves may need at once (packed sources + receive buffers):
        the model runner keeps it out of the KV cache when EPLB is on."""
        if self.parallel.eplb_interval <= 0:
            return 0
        moe = next(iter(self.moe_layers.values()))
        return 2 * self.slots_per_rank * moe.packed_numel() * moe.w13.element_size()

    def _move_weights(self, moves: list[WeightMove]) -> None:
        """One layer at a time (bounded memory): every rank walks the same list, and a layer's
        sources are read (packed) before any of its slots is written."""
        by_layer: dict[int, list[tuple[int, WeightMove]]] = {}
        for tag, mv in enumerate(moves):
            by_layer.setdefault(mv.layer, []).append((tag, mv))
        for layer in sorted(by_layer):
            self._move_layer(by_layer[layer])

    def _move_layer(self, moves: list[tuple[int, WeightMove]]) -> None:
        me, per_rank = self.rank, self.slots_per_rank
        ops, writes = [], []
        for tag, mv in moves:
            moe = self.moe_layers[mv.layer]
            if mv.src_rank == me:
                packed = moe.pack_slot(mv.src_slot - me * per_rank)
                if mv.dst_rank == me:
                    writes.append((moe, mv.slot - me * per_rank, packed))
                else:
                    ops.append(dist.P2POp(dist.isend, packed, mv.dst_rank, self.group.group, tag))
            elif mv.dst_rank == me:
                buf = moe.empty_packed()
                ops.append(dist.P2POp(dist.irecv, buf, mv.src_rank, self.group.group, tag))
                writes.append((moe, mv.slot - me * per_rank, buf))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        for moe, local_slot, packed in writes:
            moe.unpack_slot(local_slot, packed)

    # ------------------------------------------------------------- stats
    def stats(self) -> dict:
        """Cumulative tokens per (layer, logical expert) and the window's imbalance per layer."""
        total = self.total_load.cpu()
        layers = sorted(self.moe_layers)
        tokens = {(layer, e): int(total[layer, e]) for layer in layers for e in range(self.num_experts)}
        imb = self.expert_map.placement.imbalance(self.global_window)
        return {"ep_rank": self.rank, "ep_size": self.group.size, "ep_backend": self.backend_name,
                "expert_tokens": tokens, "ep_imbalance": {layer: float(imb[layer]) for layer in layers},
                "eplb_rebalances": self.num_rebalances, "eplb_weight_moves": self.num_weight_moves,
                "ep_two_batch_steps": self.num_two_batch_steps}

    def close(self) -> None:
        self.group.close()
