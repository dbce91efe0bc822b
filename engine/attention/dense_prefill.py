"""Dense prefill for GQA: a prefill-only step in which no sequence has a cached prefix needs no
paged reads at all — every key and value is this step's own — so each sequence runs torch SDPA's
fused causal kernels (flash / cuDNN / memory-efficient on CUDA) over its contiguous q, k, v.
Chunked prefill over a cached prefix, and any step with decodes, stays on the paged kernels.
Not for CUDA-graph capture (decode steps never take it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata


def is_dense_prefill(meta: AttentionMetadata) -> bool:
    """Prefill-only, and every sequence's whole KV is new in this step."""
    return meta.num_decode_tokens == 0 and meta.query_lens_cpu == meta.seq_lens_cpu


def dense_prefill_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
    """q `[T, Hq, D]`, k/v `[T, Hkv, D]` (sequences back to back) → causal attention `[T, Hq, D]`.
    Inputs go to SDPA 4-D (`[1, H, L, D]`): its fused kernels take only batched 4-D tensors. KV
    heads are expanded to the query heads (a copy of 2·T·Hq·D elements, small next to the
    attention) rather than passed with `enable_gqa`, which not every fused SDPA kernel takes;
    `bench/kernels_bench.py` times both."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    start = 0
    for qlen in meta.query_lens_cpu:
        rows = slice(start, start + qlen)
        start += qlen
        qs, ks, vs = (x[rows].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        if group > 1:
            ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out[rows] = o[0].transpose(0, 1)
    return out
