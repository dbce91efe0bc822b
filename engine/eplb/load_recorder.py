"""Per-layer expert load over a sliding window of engine steps, kept on the device.

Owns the step counter tensor that MoE layers add into (`ForwardBatch.expert_load`) and a ring
of the last `window` steps. Nothing here reads a tensor back to the host during a step: the
ring position is a Python int and the window sum is kept up to date with device ops, so
recording costs no GPU sync. It must not decide when to rebalance or touch placements beyond
measuring them (`imbalance`).
"""
from __future__ import annotations

import torch

from engine.eplb.algorithm import ExpertPlacement


class ExpertLoadRecorder:
    """Usage per engine step: pass `step_load` as `ForwardBatch.expert_load`, run the forward,
    then call `end_step()`. `window_load()` is the load of the last `window` ended steps."""

    def __init__(self, num_layers: int, num_logical_experts: int, window: int,
                 device: torch.device | str = "cpu"):
        if window < 1:
            raise ValueError(f"EPLB load window must be >= 1 step, got {window}")
        self.num_layers, self.num_logical_experts, self.window = num_layers, num_logical_experts, window
        shape = (num_layers, num_logical_experts)
        # int32 per step (a step routes far fewer than 2^31 tokens); int64 for the window sum.
        self.step_load = torch.zeros(shape, dtype=torch.int32, device=device)
        self._ring = torch.zeros((window, *shape), dtype=torch.int32, device=device)
        self._window_sum = torch.zeros(shape, dtype=torch.int64, device=device)
        self._next = 0  # ring slot the next ended step overwrites
        self.num_steps = 0  # steps ended since creation or the last reset

    def end_step(self) -> None:
        """Move this step's counts into the window (dropping the oldest step) and zero them."""
        oldest = self._ring[self._next]
        self._window_sum.sub_(oldest).add_(self.step_load)
        oldest.copy_(self.step_load)
        self.step_load.zero_()
        self._next = (self._next + 1) % self.window
        self.num_steps += 1

    @property
    def window_full(self) -> bool:
        return self.num_steps >= self.window

    def window_load(self) -> torch.Tensor:
        """[num_layers, num_logical_experts] float32 tokens per expert over the window (device)."""
        return self._window_sum.to(torch.float32)

    def imbalance(self, placement: ExpertPlacement) -> torch.Tensor:
        """[num_layers] max / mean GPU load of the window under `placement` (host; syncs)."""
        if placement.replica_count.shape != (self.num_layers, self.num_logical_experts):
            raise ValueError(f"placement is for {tuple(placement.replica_count.shape)} (layers, experts), "
                             f"recorder for {(self.num_layers, self.num_logical_experts)}")
        return placement.imbalance(self.window_load().cpu())

    def reset(self) -> None:
        """Forget the window. (Logical load does not depend on the placement, so a rebalance
        needs no reset.)"""
        self.step_load.zero_()
        self._ring.zero_()
        self._window_sum.zero_()
        self._next = 0
        self.num_steps = 0
