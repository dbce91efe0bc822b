"""Torch reference of the paged KV write (what `paged_attention.write_kv` and the fused write in
`rope_kv.py` reproduce): values scattered into one component of the pool at flat slots."""
from __future__ import annotations

import torch


def write_kv(kv_cache: torch.Tensor, component: int, values: torch.Tensor, slot_mapping: torch.Tensor):
    """Scatter `values [T, H, D]` into `kv_cache[:, component]` at flat slots; slot -1 is skipped."""
    page_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    # Index the (non-contiguous) component view directly: a reshape of it would copy.
    kv_cache[slots // page_size, component, slots % page_size] = values[keep].to(kv_cache.dtype)
