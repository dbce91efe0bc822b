"""Reference attention over the paged KV pool in plain torch (float32 math, a loop over
sequences). It is the CPU backend and the reference every GPU kernel is checked against."""
from __future__ import annotations

import torch

from engine.attention.metadata import AttentionMetadata
from engine.kernels.kv_write_ref import write_kv  # noqa: F401 (re-exported for layers)


def gather_kv(kv_cache: torch.Tensor, component: int, table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` cached entries of one sequence: `[seq_len, H, D]`."""
    page_size = kv_cache.shape[2]
    n_pages = (seq_len + page_size - 1) // page_size
    pages = kv_cache[table[:n_pages].long(), component]  # [n, page_size, H, D]
    return pages.reshape(-1, *pages.shape[2:])[:seq_len]


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                        v_component: int, v_dim: int | None = None) -> torch.Tensor:
    """Causal attention of q `[T, Hq, Dq]` over the cache; keys are component 0, values component
    `v_component` truncated to `v_dim` channels. Returns `[T, Hq, Dv]` in q's dtype."""
    out_dim = v_dim if v_dim is not None else kv_cache.shape[-1]
    out = torch.empty(q.shape[0], q.shape[1], out_dim, dtype=q.dtype, device=q.device)
    starts = meta.query_start_loc.tolist()
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        qb = q[starts[b]: starts[b] + qlen].float()  # [q, Hq, D]
        k = gather_kv(kv_cache, 0, meta.block_tables[b], slen).float()  # [s, Hkv, Dk]
        v = gather_kv(kv_cache, v_component, meta.block_tables[b], slen).float()[..., :out_dim]
        group = qb.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qb, k[..., : qb.shape[-1]]) * scale
        q_pos = torch.arange(slen - qlen, slen, device=q.device)[:, None]
        k_pos = torch.arange(slen, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[starts[b]: starts[b] + qlen] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


class TorchAttentionBackend:
    name = "torch"

    def gqa(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float, kv_written: bool = False):
        if not kv_written:
            write_kv(kv_cache, 0, k, meta.slot_mapping)
            write_kv(kv_cache, 1, v, meta.slot_mapping)
        return paged_attention_ref(q, kv_cache, meta, scale, v_component=1)

    def mla(self, q, latent, kv_cache, meta: AttentionMetadata, scale: float, v_dim: int, kv_written: bool = False):
        if not kv_written:
            write_kv(kv_cache, 0, latent.unsqueeze(1), meta.slot_mapping)
        return paged_attention_ref(q, kv_cache, meta, scale, v_component=0, v_dim=v_dim)
