"""Triton fused GQA attention prologue with the contract of `rope_kv_ref.qk_norm_rope_write_kv`:
one program per (token, query or KV head) reads its head of the merged QKV projection once,
applies the per-head RMSNorm (Qwen3), rotates it, stores q (or k), and for KV heads writes k and
v straight into their page slot. Replaces ~20 torch kernels per layer (splits, norms, gathers of
cos/sin, float casts, cat, two scatter writes). For MLA, `mla_kv_entry` builds the cached entry
(normed latent ++ rotated rope key) and writes it to its page slot in one kernel, and `mla_query`
assembles the absorbed query (latent part ++ rotated q_pe); at decode sizes `mla_absorbed_query` also
does the key up-projection's absorption (`q_nope @ W_UK`, a batched GEMM otherwise) in the same kernel.
Launch shapes depend only on T (graph-safe)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.pdl import signal_then_wait


@triton.jit
def _norm_rope(src, w, cos_row, sin_row, eps, HAS_NORM: tl.constexpr, INTERLEAVED: tl.constexpr,
               D: tl.constexpr, HALF: tl.constexpr):
    """Load one head (D channels at `src`), RMSNorm it (if HAS_NORM), rotate → (o1, o2, i1, i2): the
    two rotated halves in float32 and their channel offsets."""
    j = tl.arange(0, HALF)
    if INTERLEAVED:
        i1, i2 = 2 * j, 2 * j + 1
    else:
        i1, i2 = j, j + HALF
    a = tl.load(src + i1)
    b = tl.load(src + i2)
    af, bf = a.to(tl.float32), b.to(tl.float32)
    if HAS_NORM:
        inv = 1.0 / tl.sqrt((tl.sum(af * af, axis=0) + tl.sum(bf * bf, axis=0)) / D + eps)
        # Rounded to the activation dtype after the norm and after the weight, as the torch form.
        af = ((af * inv).to(a.dtype).to(tl.float32) * tl.load(w + i1).to(tl.float32)).to(a.dtype).to(tl.float32)
        bf = ((bf * inv).to(a.dtype).to(tl.float32) * tl.load(w + i2).to(tl.float32)).to(a.dtype).to(tl.float32)
    c = tl.load(cos_row + j)
    s = tl.load(sin_row + j)
    return af * c - bf * s, bf * c + af * s, i1, i2


@triton.jit
def _qk_norm_rope_kv_kernel(qkv, pos, cos, sin, qw, kw, q_out, k_out, kv, slots, eps, stride_t, stride_cos,
                            stride_kp, stride_kc, stride_ks, stride_kh,
                            HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                            HAS_NORM: tl.constexpr, INTERLEAVED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    p = tl.load(pos + t).to(tl.int64)
    cos_row = cos + p * stride_cos
    sin_row = sin + p * stride_cos
    row = qkv + t * stride_t
    if h < HQ:
        o1, o2, i1, i2 = _norm_rope(row + h * D, qw, cos_row, sin_row, eps, HAS_NORM, INTERLEAVED, D, HALF)
        dst = q_out + (t * HQ + h) * D
        tl.store(dst + i1, o1.to(q_out.dtype.element_ty))
        tl.store(dst + i2, o2.to(q_out.dtype.element_ty))
    else:
        kh = h - HQ
        o1, o2, i1, i2 = _norm_rope(row + (HQ + kh) * D, kw, cos_row, sin_row, eps, HAS_NORM, INTERLEAVED, D, HALF)
        k1 = o1.to(k_out.dtype.element_ty)
        k2 = o2.to(k_out.dtype.element_ty)
        dst = k_out + (t * HKV + kh) * D
        tl.store(dst + i1, k1)
        tl.store(dst + i2, k2)
        slot = tl.load(slots + t)
        if slot >= 0:
            page_base = kv + (slot // PAGE) * stride_kp + (slot % PAGE) * stride_ks + kh * stride_kh
            tl.store(page_base + i1, k1.to(kv.dtype.element_ty))
            tl.store(page_base + i2, k2.to(kv.dtype.element_ty))
            dv = tl.arange(0, D)
            v = tl.load(row + (HQ + HKV + kh) * D + dv)
            tl.store(page_base + stride_kc + dv, v.to(kv.dtype.element_ty))


def qk_norm_rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                          interleaved: bool = False):
    t = qkv.shape[0]
    d = kv_cache.shape[-1]
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = torch.empty((t, num_heads, d), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((t, num_kv_heads, d), dtype=qkv.dtype, device=qkv.device)
    v = qkv[:, (num_heads + num_kv_heads) * d:].view(t, num_kv_heads, d)
    if t:
        has_norm = q_norm is not None
        _qk_norm_rope_kv_kernel[(t, num_heads + num_kv_heads)](
            qkv, positions, cos, sin, q_norm if has_norm else cos, k_norm if has_norm else cos, q, k, kv_cache,
            slot_mapping, eps, qkv.stride(0), cos.stride(0), kv_cache.stride(0), kv_cache.stride(1),
            kv_cache.stride(2), kv_cache.stride(3), HQ=num_heads, HKV=num_kv_heads, D=d, PAGE=kv_cache.shape[2],
            HAS_NORM=has_norm, INTERLEAVED=interleaved, num_warps=1)
    return q, k, v


@triton.jit
def _mla_entry_kernel(kv_a, pos, cos, sin, w, out, kv, slots, eps, stride_a, stride_o, stride_cos, stride_kp,
                      stride_ks, R: tl.constexpr, BLOCK_R: tl.constexpr, P: tl.constexpr, PAGE: tl.constexpr,
                      INTERLEAVED: tl.constexpr, WRITE_CACHE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    src = kv_a + t * stride_a
    dst = out + t * stride_o
    r = tl.arange(0, BLOCK_R)
    x = tl.load(src + r, mask=r < R, other=0.0)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / R + eps)
    y = ((xf * inv).to(x.dtype).to(tl.float32) * tl.load(w + r, mask=r < R, other=0.0).to(tl.float32))
    y = y.to(out.dtype.element_ty)
    tl.store(dst + r, y, mask=r < R)
    p = tl.load(pos + t).to(tl.int64)
    o1, o2, i1, i2 = _norm_rope(src + R, w, cos + p * stride_cos, sin + p * stride_cos, eps, False, INTERLEAVED,
                                P, P // 2)
    o1 = o1.to(out.dtype.element_ty)
    o2 = o2.to(out.dtype.element_ty)
    tl.store(dst + R + i1, o1)
    tl.store(dst + R + i2, o2)
    if WRITE_CACHE:
        slot = tl.load(slots + t)
        if slot >= 0:  # the entry's page slot (component 0, KV head 0): same values, same dtype
            row = kv + (slot // PAGE) * stride_kp + (slot % PAGE) * stride_ks
            tl.store(row + r, y, mask=r < R)
            tl.store(row + R + i1, o1)
            tl.store(row + R + i2, o2)


def mla_kv_entry(kv_a: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 norm_weight: torch.Tensor, eps: float, interleaved: bool = True, kv_cache: torch.Tensor | None = None,
                 slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
    t, width = kv_a.shape
    p = 2 * cos.shape[-1]
    r = width - p
    if kv_a.stride(-1) != 1:
        kv_a = kv_a.contiguous()
    out = torch.empty((t, width), dtype=torch.promote_types(kv_a.dtype, norm_weight.dtype), device=kv_a.device)
    write = kv_cache is not None
    if write and kv_cache.dtype != out.dtype:
        raise ValueError(f"mla_kv_entry writes the cache in the entry's dtype {out.dtype}, got a {kv_cache.dtype} pool")
    kv = kv_cache if write else out
    if t:
        _mla_entry_kernel[(t,)](kv_a, positions, cos, sin, norm_weight, out, kv, slot_mapping if write else positions,
                                eps, kv_a.stride(0), out.stride(0), cos.stride(0), kv.stride(0),
                                kv.stride(2) if write else 0, R=r, BLOCK_R=triton.next_power_of_2(r), P=p,
                                PAGE=kv.shape[2] if write else 1, INTERLEAVED=interleaved, WRITE_CACHE=write,
                                num_warps=4)
    return out


@triton.jit
def _mla_query_kernel(q_latent, q, pos, cos, sin, out, stride_lt, stride_lh, stride_qt, stride_qh, stride_ot,
                      stride_oh, stride_cos, R: tl.constexpr, BLOCK_R: tl.constexpr, NOPE: tl.constexpr,
                      P: tl.constexpr, INTERLEAVED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    dst = out + t * stride_ot + h * stride_oh
    r = tl.arange(0, BLOCK_R)
    lat = tl.load(q_latent + t * stride_lt + h * stride_lh + r, mask=r < R, other=0.0)
    tl.store(dst + r, lat.to(out.dtype.element_ty), mask=r < R)
    p = tl.load(pos + t).to(tl.int64)
    o1, o2, i1, i2 = _norm_rope(q + t * stride_qt + h * stride_qh + NOPE, cos, cos + p * stride_cos,
                                sin + p * stride_cos, 0.0, False, INTERLEAVED, P, P // 2)
    tl.store(dst + R + i1, o1.to(out.dtype.element_ty))
    tl.store(dst + R + i2, o2.to(out.dtype.element_ty))


def mla_query(q_latent: torch.Tensor, q: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    t, h, r = q_latent.shape
    p = 2 * cos.shape[-1]
    nope = q.shape[-1] - p
    if q_latent.stride(-1) != 1:
        q_latent = q_latent.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty((t, h, r + p), dtype=q_latent.dtype, device=q_latent.device)
    if t:
        _mla_query_kernel[(t, h)](q_latent, q, positions, cos, sin, out, q_latent.stride(0), q_latent.stride(1),
                                  q.stride(0), q.stride(1), out.stride(0), out.stride(1), cos.stride(0), R=r,
                                  BLOCK_R=triton.next_power_of_2(r), NOPE=nope, P=p, INTERLEAVED=interleaved,
                                  num_warps=4)
    return out


ABSORB_MAX_TOKENS = 4  # larger batches take cuBLAS's batched GEMM (the weight is then read once per token here)


@triton.jit(do_not_specialize=['num_tokens'])  # token counts: one compile for every step size
def _mla_absorbed_query_kernel(q, w_uk, pos, cos, sin, out, num_tokens, stride_qt, stride_qh, stride_wh, stride_wd,
                               stride_ot, stride_oh, stride_cos, R: tl.constexpr, NOPE: tl.constexpr, P: tl.constexpr,
                               INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    """One program per (head, BLOCK_R latent channels), all tokens: `q_nope[t, h] @ w_uk[h]` for its
    channels (float32, rounded once, as the batched GEMM); the first channel block of each head also
    writes the head's rotated rope part for every token. The first `w_uk` tile is loaded before waiting
    for the kernel before (engine/kernels/pdl.py)."""
    h = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    toks = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    r_ok, t_ok = r < R, toks < num_tokens
    q_head = q + h * stride_qh
    w_first = tl.load(w_uk + h * stride_wh + d[:, None] * stride_wd + r[None, :],
                      mask=(d < NOPE)[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    signal_then_wait(USE_PDL)
    acc = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
    for d0 in tl.static_range(0, NOPE, BLOCK_D):
        d_ok = (d0 + d) < NOPE
        qv = tl.load(q_head + toks[:, None] * stride_qt + d0 + d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        if d0 == 0:
            wv = w_first
        else:
            wv = tl.load(w_uk + h * stride_wh + (d0 + d)[:, None] * stride_wd + r[None, :],
                         mask=d_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(qv[:, :, None] * wv[None, :, :], axis=1)
    dt = out.dtype.element_ty
    dst = out + h * stride_oh
    tl.store(dst + toks[:, None] * stride_ot + r[None, :], acc.to(dt), mask=t_ok[:, None] & r_ok[None, :])
    if tl.program_id(1) == 0:
        for t in range(num_tokens):
            p = tl.load(pos + t).to(tl.int64)
            o1, o2, i1, i2 = _norm_rope(q_head + t * stride_qt + NOPE, cos, cos + p * stride_cos, sin + p * stride_cos,
                                        0.0, False, INTERLEAVED, P, P // 2)
            tl.store(dst + t * stride_ot + R + i1, o1.to(dt))
            tl.store(dst + t * stride_ot + R + i2, o2.to(dt))


def mla_absorbed_query(q: torch.Tensor, w_uk: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """`rope_kv_ref.mla_absorbed_query` in one kernel (the batched GEMM and `mla_query` fused) for up
    to `ABSORB_MAX_TOKENS` tokens: q `[T, H, nope + P]`, w_uk `[H, nope, R]` in q's dtype."""
    t, h, _ = q.shape
    _, nope, r = w_uk.shape
    p = 2 * cos.shape[-1]
    if t > ABSORB_MAX_TOKENS or w_uk.dtype != q.dtype:
        raise ValueError(f"mla_absorbed_query takes at most {ABSORB_MAX_TOKENS} tokens with w_uk in q's dtype "
                         f"(got {t} tokens, {w_uk.dtype} vs {q.dtype})")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if w_uk.stride(-1) != 1:  # other strides are the kernel's (the layer passes a view of kv_b's weight)
        w_uk = w_uk.contiguous()
    out = torch.empty((t, h, r + p), dtype=q.dtype, device=q.device)
    if t:
        block_r, block_d = (16, 8) if q.device.type == "cpu" else (64, 32)
        _mla_absorbed_query_kernel[(h, triton.cdiv(r, block_r))](
            q, w_uk, positions, cos, sin, out, t, q.stride(0), q.stride(1), w_uk.stride(0), w_uk.stride(1),
            out.stride(0), out.stride(1), cos.stride(0), R=r, NOPE=nope, P=p, INTERLEAVED=interleaved,
            BLOCK_T=triton.next_power_of_2(t), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
            **pdl.launch_args(q.device))
    return out
