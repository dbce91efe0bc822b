"""Expert-parallel load balancing: measure per-expert load, compute a placement with redundant
experts, and keep the live logical->physical map. Pure placement logic; moving weights between
ranks belongs to the expert-parallel MoE layer."""
from engine.eplb.algorithm import ExpertPlacement, initial_placement, initial_slot_experts, rebalance
from engine.eplb.expert_map import ExpertMap, WeightMove
from engine.eplb.load_recorder import ExpertLoadRecorder

__all__ = ["ExpertLoadRecorder", "ExpertMap", "ExpertPlacement", "WeightMove", "initial_placement",
           "initial_slot_experts", "rebalance"]
