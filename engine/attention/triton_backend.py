"""The GPU attention backend: Triton paged kernels behind the `AttentionBackend` interface. Decode
rows (query length 1, first in the batch) go to a split-KV decode kernel — GQA's in
engine/kernels/paged_attention.py, MLA's all-heads-per-latent-tile kernel in
engine/kernels/mla_decode.py — and the rest to one varlen flash-attention call (GQA, half precision:
prefill-only steps over the step's own keys and values, chunks over cached prefixes over their sequences
gathered back from the pages; `dense_prefill.py`) or else the Triton prefill-with-prefix kernel. The pure-decode
path reads only device tensors and batch-size-dependent shapes, so it runs under CUDA graph capture."""
from __future__ import annotations

import torch

from engine.attention.dense_prefill import dense_prefill_gqa, is_dense_prefill, varlen_applies, varlen_flash
from engine.attention.metadata import AttentionMetadata
from engine.kernels.mla_decode import mla_decode
from engine.kernels.paged_attention import decode_attention, prefill_attention, write_kv


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class TritonAttentionBackend:
    name = "triton"

    def gqa(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float, kv_written: bool = False):
        if not kv_written:
            write_kv(kv_cache, 0, k, meta.slot_mapping)
            write_kv(kv_cache, 1, v, meta.slot_mapping)
        if is_dense_prefill(meta):
            return dense_prefill_gqa(q, k, v, meta, scale)
        d = q.shape[-1]
        if not _pow2(d):
            raise ValueError(f"triton attention needs a power-of-two head_dim, got {d}")
        return self._attend(q, kv_cache, meta, scale, k_comp=0, v_comp=1, da=d, db=0)

    def mla(self, q, latent, kv_cache, meta: AttentionMetadata, scale: float, v_dim: int, kv_written: bool = False):
        if not kv_written:
            write_kv(kv_cache, 0, latent.unsqueeze(1), meta.slot_mapping)
        db = q.shape[-1] - v_dim
        if not _pow2(v_dim) or not _pow2(db):
            raise ValueError(f"triton MLA needs power-of-two latent ({v_dim}) and rope ({db}) dims")
        return self._attend(q, kv_cache, meta, scale, k_comp=0, v_comp=0, da=v_dim, db=db)

    @staticmethod
    def _attend(q, kv_cache, meta: AttentionMetadata, scale, k_comp, v_comp, da, db):
        q = q.contiguous()
        out = torch.empty(q.shape[0], q.shape[1], da, dtype=q.dtype, device=q.device)
        nd = meta.num_decode_tokens
        if nd and k_comp == v_comp:  # MLA: the latent is both key (with the rope channels) and value
            mla_decode(q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale, da, out[:nd],
                       max_seq_len=meta.decode_context_bound)
        elif nd:
            decode_attention(q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                             k_comp, v_comp, da, db, out[:nd], max_seq_len=meta.decode_context_bound)
        num_prefill = meta.num_seqs - nd
        done = None
        if num_prefill > 0 and k_comp != v_comp and varlen_applies(q, da):
            # GQA chunks over cached prefixes: their whole sequences gathered from the pages once, then
            # one varlen flash call (bottom-right causal) instead of the paged prefill kernel
            pages, offsets, cu_k = meta.context_index(nd)
            k, v = kv_cache[pages, k_comp, offsets], kv_cache[pages, v_comp, offsets]
            if k.dtype != q.dtype:  # an FP8 pool (scale 1) is read in the query's dtype, as the kernels do
                k, v = k.to(q.dtype), v.to(q.dtype)
            done = varlen_flash(q[nd:], k, v, meta.query_starts_from(nd), cu_k, max(meta.query_lens_cpu[nd:]),
                                max(meta.seq_lens_cpu[nd:]), scale)
        if done is not None:
            out[nd:] = done
        elif num_prefill > 0:
            max_q = max(meta.query_lens_cpu[nd:])
            prefill_attention(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, nd, num_prefill,
                              max_q, scale, k_comp, v_comp, da, db, out)
        return out
