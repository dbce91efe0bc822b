"""The paged KV pool's memory: one tensor per layer, `[num_pages, *spec.page_shape]`.

Pages of one layer are contiguous and a page is one contiguous block, so a KV transfer is a
list of `(layer, page)` blocks of `spec.page_bytes` each, and memory registration for RDMA is
one region per layer. This module owns the tensors only; which pages belong to whom is the
block pool's business (`block_pool.py`).
"""
from __future__ import annotations

import torch

from engine.config import KVCacheSpec


class KVPool:
    def __init__(self, spec: KVCacheSpec, num_pages: int, device: torch.device | str):
        if num_pages < 1:
            raise ValueError(f"a KV pool needs at least one page, got {num_pages}")
        self.spec = spec
        self.num_pages = num_pages
        self.device = torch.device(device)
        self.layers: list[torch.Tensor] = [
            torch.zeros((num_pages, *spec.page_shape), dtype=spec.dtype, device=self.device)
            for _ in range(spec.num_layers)
        ]

    @property
    def total_bytes(self) -> int:
        return self.spec.page_bytes * self.num_pages * self.spec.num_layers

    def page_address(self, layer: int, page: int) -> int:
        """Device address of one page of one layer (for transfer descriptor lists)."""
        return self.layers[layer].data_ptr() + page * self.spec.page_bytes

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Copy page `src` to page `dst` in every layer, for each `(src, dst)` (copy on write of a
        shared page; enqueued on the device before the step that writes `dst`). Each `dst` at most
        once; every source is read before any destination is written."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], dtype=torch.long).to(self.device, non_blocking=True)
        dst = torch.tensor([d for _, d in copies], dtype=torch.long).to(self.device, non_blocking=True)
        for layer in self.layers:
            layer.index_copy_(0, dst, layer.index_select(0, src))

    @staticmethod
    def pages_for_budget(spec: KVCacheSpec, budget_bytes: int) -> int:
        return max(0, budget_bytes // (spec.page_bytes * spec.num_layers))
