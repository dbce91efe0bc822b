"""The attention backend interface and the one place a backend is chosen.

A backend writes this step's new KV into the paged pool and computes attention of the new
queries over everything the sequence has cached. Two entry points:

* `gqa(q, k, v, kv_cache, meta, scale, kv_written=False)`: q `[T, Hq, D]`, k/v `[T, Hkv, D]`,
  kv_cache `[num_pages, 2, page_size, Hkv, D]` → `[T, Hq, D]`. With `kv_written` the caller has
  already put k and v in the pool (the fused rotary + KV-write prologue).
* `mla(q, latent, kv_cache, meta, scale, v_dim)`: the weight-absorbed MLA form, i.e. multi-query
  attention with one shared KV head. q `[T, H, R + P]` (latent query ++ rope query), latent
  `[T, R + P]` (compressed KV ++ rope key: exactly what is cached), kv_cache
  `[num_pages, 1, page_size, 1, R + P]` → `[T, H, v_dim]` where the value is the first `v_dim`
  (= R) channels of the cached entry.

Both must be safe under CUDA graph capture for pure-decode batches on GPU backends (no host
synchronisation, no shapes that depend on tensor values).
"""
from __future__ import annotations

from typing import Protocol

import torch

from engine.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def gqa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
            meta: AttentionMetadata, scale: float, kv_written: bool = False) -> torch.Tensor: ...

    def mla(self, q: torch.Tensor, latent: torch.Tensor, kv_cache: torch.Tensor,
            meta: AttentionMetadata, scale: float, v_dim: int, kv_written: bool = False) -> torch.Tensor: ...


def select_backend(device: torch.device | str, name: str = "auto") -> AttentionBackend:
    """`auto`: Triton kernels on CUDA, the torch reference elsewhere."""
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from engine.attention.torch_backend import TorchAttentionBackend
        return TorchAttentionBackend()
    if name == "triton":
        from engine.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; expected auto, torch or triton")
