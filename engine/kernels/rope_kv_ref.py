"""Torch reference of the fused GQA attention prologue (`rope_kv.py`): split the merged QKV
projection, per-head RMSNorm of q and k (Qwen3; skipped when no weights), rotary embedding of q
and k, and the write of k and v into the paged KV pool `[num_pages, 2, page_size, Hkv, D]`; and
MLA's cached entry (normed latent ++ rotated rope key). `apply_rope` is the rotation itself,
also what `layers/rotary.py` runs."""
from __future__ import annotations

import torch

from engine.kernels.kv_write_ref import write_kv
from engine.kernels.norm_act_ref import rms_norm


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool) -> torch.Tensor:
    """Rotate `x [T, H, dim]` (or `[T, dim]`) at `positions [T]` with float32 tables `[max_pos, dim/2]`,
    in float32, rounded back to x's dtype."""
    cos = cos[positions]  # [T, dim/2]
    sin = sin[positions]
    if x.dim() == 3:
        cos, sin = cos[:, None, :], sin[:, None, :]
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if interleaved:
        out = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        out = torch.cat((o1, o2), dim=-1)
    return out.to(x.dtype)


def qk_norm_rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                          interleaved: bool = False):
    """qkv `[T, (Hq + 2 Hkv) * D]` → (q `[T, Hq, D]`, k `[T, Hkv, D]`, v `[T, Hkv, D]`), q and k
    normed and rotated; k and v written to the pool at `slot_mapping` (slot -1 skipped)."""
    t = qkv.shape[0]
    d = kv_cache.shape[-1]
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q, k, v = q.view(t, num_heads, d), k.view(t, num_kv_heads, d), v.view(t, num_kv_heads, d)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q = apply_rope(q, positions, cos, sin, interleaved)
    k = apply_rope(k, positions, cos, sin, interleaved)
    write_kv(kv_cache, 0, k, slot_mapping)
    write_kv(kv_cache, 1, v, slot_mapping)
    return q, k, v


def mla_kv_entry(kv_a: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 norm_weight: torch.Tensor, eps: float, interleaved: bool = True, kv_cache: torch.Tensor | None = None,
                 slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
    """MLA's cached entry from the `kv_a_proj_with_mqa` output `[T, R + P]`: the RMS-normed
    latent (R channels) followed by the rotated shared rope key (P = 2 * cos.shape[-1]); with
    `kv_cache` (the MLA pool `[pages, 1, page, 1, R + P]`) also written at `slot_mapping`."""
    p = 2 * cos.shape[-1]
    latent, k_pe = kv_a.split([kv_a.shape[-1] - p, p], dim=-1)
    entry = torch.cat([rms_norm(latent, norm_weight, eps), apply_rope(k_pe, positions, cos, sin, interleaved)], dim=-1)
    if kv_cache is not None:
        write_kv(kv_cache, 0, entry.unsqueeze(1), slot_mapping)
    return entry


def mla_query(q_latent: torch.Tensor, q: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """MLA's absorbed query `[T, H, R + P]`: the latent-space part `q_latent [T, H, R]` followed by
    the rotated rope part of the projected query `q [T, H, nope + P]` (its last P channels)."""
    p = 2 * cos.shape[-1]
    q_pe = apply_rope(q[..., q.shape[-1] - p:], positions, cos, sin, interleaved)
    return torch.cat([q_latent, q_pe.to(q_latent.dtype)], dim=-1)


def mla_absorbed_query(q: torch.Tensor, w_uk: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """MLA's absorbed decode query `[T, H, R + P]` from the projected query `q [T, H, nope + P]`: the
    no-rope part moved into latent space by the absorbed key up-projection `w_uk [H, nope, R]`
    (a batched GEMM), followed by the rotated rope part (`mla_query`)."""
    nope = w_uk.shape[1]
    q_latent = torch.bmm(q[..., :nope].transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, R]
    return mla_query(q_latent, q, positions, cos, sin, interleaved)
