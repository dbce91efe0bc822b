"""Dense prefill for GQA: a prefill-only step in which no sequence has a cached prefix needs no
paged reads at all — every key and value is this step's own — so it runs fused causal attention
over the contiguous q, k, v. On CUDA in half precision that is one varlen flash-attention call for
all sequences of the step (`varlen_flash`: no loop over sequences on the host, GQA without
expanding the KV heads); elsewhere each sequence runs torch SDPA (flash / cuDNN /
memory-efficient / math). Chunks over a cached prefix go through the same varlen call from the
attention backend (their sequences gathered back from the pages; triton_backend.py). The varlen call
reads only device offsets and a host length bound, so dense steps are captured as CUDA graphs
(engine/prefill_graph.py); the per-sequence path refuses capture."""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from engine.attention.metadata import AttentionMetadata

log = logging.getLogger(__name__)


def is_dense_prefill(meta: AttentionMetadata) -> bool:
    """Prefill-only, and every sequence's whole KV is new in this step."""
    return meta.num_decode_tokens == 0 and meta.query_lens_cpu == meta.seq_lens_cpu


_ALL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
VARLEN = True  # the one-call varlen flash path where it applies (a switch for benchmarks and checks)


@functools.cache
def _flash_arch(device: torch.device) -> bool:
    """FlashAttention-2 in torch runs on sm80 and newer."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def varlen_applies(q: torch.Tensor, head_dim: int) -> bool:
    """Whether `varlen_flash` runs for queries like `q` with this head size (else it returns None)."""
    return (VARLEN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
            and head_dim % 8 == 0 and _flash_arch(q.device))


def varlen_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int, scale: float) -> torch.Tensor | None:
    """Causal flash attention over sequences back to back: q `[Tq, Hq, D]`, k/v `[Tk, Hkv, D]` (Hkv
    divides Hq), `cu_q` / `cu_k` int32 `[B + 1]` on the device, `max_q` / `max_k` host bounds. Where a
    sequence has more keys than queries the mask is bottom-right aligned (its queries are its last
    positions). None where the kernel does not apply (CPU, float32, head size over 256 or not a
    multiple of 8), so the caller takes its own path."""
    d = q.shape[-1]
    if not (varlen_applies(q, d) and k.shape[-1] == d and v.shape[-1] == d and q.shape[1] % k.shape[1] == 0):
        return None
    global VARLEN
    try:
        return _flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    except (RuntimeError, TypeError) as e:  # a torch build without the op's varlen form: the per-sequence path
        log.warning("varlen flash attention unavailable (%s); prefill attention runs per sequence", e)
        VARLEN = False
        return None


def _flash_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """torch's FlashAttention-2 op in its varlen form (causal is bottom-right aligned, GQA native)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                   scale=scale)[0]


def causal_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  q_lens: list[int], k_lens: list[int], scale: float,
                  backends: list[SDPBackend] | None = None) -> torch.Tensor:
    """`varlen_flash` where it applies, else the same attention per sequence with SDPA (bottom-right
    causal where a sequence has more keys than queries; KV heads expanded to the query heads;
    `backends` restricts SDPA's choice). `q_lens` / `k_lens`: the host's copies of the lengths."""
    out = varlen_flash(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), scale)
    if out is not None:
        return out
    if q.is_cuda and torch.cuda.is_current_stream_capturing():  # the loop below reads host lengths
        raise RuntimeError("per-sequence prefill attention cannot run inside a CUDA graph")
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    group = q.shape[1] // k.shape[1]
    qs = ks = 0
    for qlen, klen in zip(q_lens, k_lens):
        # 4-D [1, H, L, D] views: the fused SDPA kernels take only batched 4-D inputs (3-D falls back
        # to a materialised score matrix); each needs only its last dimension contiguous.
        qb = q[qs: qs + qlen].transpose(0, 1).unsqueeze(0)
        kb, vb = (x[ks: ks + klen].transpose(0, 1).unsqueeze(0) for x in (k, v))
        if group > 1:
            kb, vb = kb.repeat_interleave(group, dim=1), vb.repeat_interleave(group, dim=1)
        if qlen == klen:
            with sdpa_kernel(backends or _ALL_BACKENDS):
                o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=causal_lower_right(qlen, klen), scale=scale)
        out[qs: qs + qlen] = o[0].transpose(0, 1)
        qs, ks = qs + qlen, ks + klen
    return out


def dense_prefill_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
    """q `[T, Hq, D]`, k/v `[T, Hkv, D]` (sequences back to back) → causal attention `[T, Hq, D]`.
    One varlen flash call where it applies; otherwise per sequence, SDPA 4-D (`[1, H, L, D]`: its
    fused kernels take only batched 4-D tensors) with the KV heads expanded to the query heads (a
    copy of 2·T·Hq·D elements, small next to the attention) rather than passed with `enable_gqa`,
    which not every fused SDPA kernel takes; `bench/kernels_bench.py` times both."""
    return causal_varlen(q, k, v, meta.query_start_loc, meta.query_start_loc, meta.query_lens_cpu,
                         meta.query_lens_cpu, scale)
