"""The process group of one node's EP ranks (one engine process per rank).

Owns torch.distributed initialisation (NCCL between GPUs, gloo on CPU) and the few small
collectives the engine loop needs besides the MoE all-to-all: agreeing whether anyone has work
this step, and summing expert load. Every rank must call these in the same order; the engine
loop guarantees it by running exactly one `step_begin` per iteration on every rank.
"""
from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class EPGroup:
    def __init__(self, rank: int, size: int, init_method: str, device: torch.device, timeout_s: float = 120.0):
        if not 0 <= rank < size:
            raise ValueError(f"EP rank {rank} outside [0, {size})")
        self.rank, self.size, self.device = rank, size, device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(self.backend, init_method=init_method, rank=rank, world_size=size,
                                    timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        self.group = dist.group.WORLD
        # Small control collectives go over gloo on the host even when tokens move over NCCL:
        # they carry a few ints and must not queue behind GPU work.
        self.cpu_group = dist.new_group(backend="gloo") if self.backend == "nccl" else self.group
        log.info("EP group ready: rank %d of %d (%s)", rank, size, self.backend)

    def agree(self, busy: bool, stop: bool, num_tokens: int = 0) -> tuple[bool, bool, int]:
        """One small all-reduce per engine iteration: does any rank have work this step, does any
        rank want to stop (then all stop together, so none is left inside a collective), and the
        most tokens any rank runs (which sizes the step's dispatches)?"""
        flags = torch.tensor([int(busy), int(stop), num_tokens], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(flags[0]), bool(flags[1]), int(flags[2])

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (expert load; host or device tensor of this group's device)."""
        group = self.cpu_group if tensor.device.type == "cpu" else self.group
        dist.all_reduce(tensor, group=group)
        return tensor

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
