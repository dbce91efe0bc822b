"""Triton kernels over the paged KV pool `[num_pages, C, page_size, H, D]`: the KV write, decode
attention (split-KV, flash-decoding style, CUDA-graph safe) and prefill-with-prefix attention.

One kernel family serves GQA and MLA. Keys are `DA (+ DB)` channels of component `k_comp` and
values the first `DA` channels of component `v_comp`: GQA uses k_comp=0, v_comp=1, DB=0; MLA
(weight-absorbed, one KV head) uses k_comp=v_comp=0 with DA = kv_lora_rank and DB = the rope
dims, so the cached entry is loaded once and used as both key and value.

Decode (the engine uses it for GQA; MLA decode has its own kernel in mla_decode.py): one program
per (sequence, block of query heads sharing a KV head, KV split); the number of splits depends
only on the batch size, each program stops at its sequence's length, and a second kernel merges
the splits (with one split, from ~33 sequences at 8 KV heads, the decode kernel stores the output
itself), so the launch shape is fixed per batch size (graph-safe).
Prefill: one program per (sequence, query head, block of query tokens), causal over the cached
prefix plus the chunk itself. Accumulation is float32 throughout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.fp8_gemm import _round_to_e4m3


@triton.jit
def _kv_write_kernel(src, kv, slots, stride_st, stride_sh, stride_kp, stride_kc, stride_ks, stride_kh,
                     COMP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                     FP8: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots + t)
    ok = slot >= 0
    page = tl.where(ok, slot // PAGE, 0)
    off = tl.where(ok, slot % PAGE, 0)
    d = tl.arange(0, BLOCK_D)
    mask = d < tl.where(ok, D, 0)
    x = tl.load(src + t * stride_st + h * stride_sh + d, mask=mask)
    if FP8:  # saturate and round like torch's cast (see fp8_gemm._round_to_e4m3)
        x = _round_to_e4m3(tl.clamp(x.to(tl.float32), -448.0, 448.0))
    dst = kv + page * stride_kp + COMP * stride_kc + off * stride_ks + h * stride_kh + d
    tl.store(dst, x.to(kv.dtype.element_ty), mask=mask)


def write_kv(kv_cache: torch.Tensor, comp: int, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """values `[T, H, D]` → `kv_cache[page, comp, offset]` at `slot_mapping` (slot -1 skipped)."""
    t, h, d = values.shape
    if t == 0:
        return
    _kv_write_kernel[(t, h)](
        values, kv_cache, slot_mapping, values.stride(0), values.stride(1), kv_cache.stride(0),
        kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), COMP=comp, D=d,
        BLOCK_D=triton.next_power_of_2(d), PAGE=kv_cache.shape[2], FP8=kv_cache.dtype == torch.float8_e4m3fn)


@triton.jit
def _load_block(kv, block_tables, row_table, kvh, n0, end, qa, qb, stride_kp, stride_kc, stride_ks, stride_kh,
                K_COMP: tl.constexpr, V_COMP: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DB: tl.constexpr):
    """Scores of the queries against KV positions n0..n0+BLOCK_N (< end) and the values there."""
    pos = n0 + tl.arange(0, BLOCK_N)
    pmask = pos < end
    page = tl.load(block_tables + row_table + pos // PAGE, mask=pmask, other=0)
    base = kv + page * stride_kp + (pos % PAGE) * stride_ks + kvh * stride_kh
    da = tl.arange(0, DA)
    # An FP8 cache (scale 1) is read in the query's dtype.
    ka = tl.load(base[:, None] + K_COMP * stride_kc + da[None, :], mask=pmask[:, None], other=0.0).to(qa.dtype)
    qk = tl.dot(qa, tl.trans(ka), out_dtype=tl.float32)
    if DB > 0:  # BLOCK_DB ≥ 16 (a tensor-core dot's K), masked to DB
        db = tl.arange(0, BLOCK_DB)
        kb = tl.load(base[:, None] + K_COMP * stride_kc + DA + db[None, :], mask=pmask[:, None] & (db < DB)[None, :],
                     other=0.0).to(qb.dtype)
        qk += tl.dot(qb, tl.trans(kb), out_dtype=tl.float32)
    if V_COMP == K_COMP:
        v = ka
    else:
        v = tl.load(base[:, None] + V_COMP * stride_kc + da[None, :], mask=pmask[:, None], other=0.0).to(qa.dtype)
    return pos, pmask, qk, v


@triton.jit
def _online_softmax(qk, v, m, l, acc):
    """One flash-attention update of (running max, running sum, unnormalised output)."""
    m_new = tl.maximum(m, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(qk - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
    return m_new, l, acc


@triton.jit
def _decode_kernel(q, kv, block_tables, seq_lens, part_acc, part_ml, out, scale,
                   stride_qt, stride_qh, stride_kp, stride_kc, stride_ks, stride_kh, stride_bt,
                   stride_ot, stride_oh,
                   K_COMP: tl.constexpr, V_COMP: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                   DA: tl.constexpr, DB: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, NUM_HEADS: tl.constexpr, BLOCK_DB: tl.constexpr):
    # Head blocks vary fastest so the programs sharing one sequence's KV run side by side and
    # read it from L2 (MLA: 128 heads share one latent).
    hb = tl.program_id(0)
    b = tl.program_id(1)
    s = tl.program_id(2)
    n_hblocks: tl.constexpr = (GROUP + BLOCK_H - 1) // BLOCK_H
    kvh = hb // n_hblocks
    local = (hb % n_hblocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = local < GROUP
    heads = kvh * GROUP + local
    seq_len = tl.load(seq_lens + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = s * chunk
    end = tl.minimum(start + chunk, seq_len)
    da = tl.arange(0, DA)
    q_row = q + b * stride_qt + heads[:, None] * stride_qh
    qa = tl.load(q_row + da[None, :], mask=hmask[:, None], other=0.0)
    if DB > 0:
        db = tl.arange(0, BLOCK_DB)
        qb = tl.load(q_row + DA + db[None, :], mask=hmask[:, None] & (db < DB)[None, :], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DA], tl.float32)
    if DB == 0:
        qb = qa
    for n0 in range(start, end, BLOCK_N):
        pos, pmask, qk, v = _load_block(kv, block_tables, b * stride_bt, kvh, n0, end, qa, qb, stride_kp, stride_kc,
                                        stride_ks, stride_kh, K_COMP, V_COMP, DA, DB, PAGE, BLOCK_N,
                                        BLOCK_DB)
        qk = tl.where(pmask[None, :], qk * scale, float("-inf"))
        m, l, acc = _online_softmax(qk, v, m, l, acc)
    if NUM_SPLITS == 1:  # nothing to merge: normalise and store the output (no second kernel)
        o_ptr = out + b * stride_ot + heads[:, None] * stride_oh + da[None, :]
        tl.store(o_ptr, (acc / l[:, None]).to(out.dtype.element_ty), mask=hmask[:, None])
    else:
        row = (b * NUM_HEADS + heads) * NUM_SPLITS + s
        tl.store(part_acc + row[:, None] * DA + da[None, :], acc, mask=hmask[:, None])
        tl.store(part_ml + row * 2, m, mask=hmask)
        tl.store(part_ml + row * 2 + 1, l, mask=hmask)


@triton.jit
def _merge_kernel(part_acc, part_ml, out, stride_ot, stride_oh, DA: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  NUM_HEADS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    row = (b * NUM_HEADS + h) * NUM_SPLITS + s
    m = tl.load(part_ml + row * 2)
    l = tl.load(part_ml + row * 2 + 1)
    m_max = tl.max(m, 0)
    w = tl.where(l > 0, tl.exp(m - m_max), 0.0)
    da = tl.arange(0, DA)
    acc = tl.load(part_acc + row[:, None] * DA + da[None, :])
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out + b * stride_ot + h * stride_oh + da, o.to(out.dtype.element_ty))


def _num_splits(batch: int, programs_per_seq: int) -> int:
    target = 264  # ~2 waves of programs on a 132-SM H100
    splits = max(1, min(16, target // max(1, batch * programs_per_seq)))
    return triton.next_power_of_2(splits)


def _block_db(db: int) -> int:
    """The second query/key part's block: a power of two of at least 16 (a tensor-core dot's K; tiny
    models' rope widths are 8), masked to `db`."""
    return max(16, triton.next_power_of_2(db)) if db else 0


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, k_comp: int, v_comp: int, da: int, db: int, out: torch.Tensor,
                     max_seq_len: int | None = None) -> None:
    """q `[B, Hq, DA+DB]` (one query per sequence) → out `[B, Hq, DA]`. `max_seq_len`: a bound on every
    `seq_lens[b]` (each split covers at least `mla_decode.MIN_TILES_PER_SPLIT` tiles of it), None if unknown."""
    from engine.kernels.mla_decode import max_splits_for
    batch, num_heads = q.shape[0], q.shape[1]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    block_h = max(16, min(64, triton.next_power_of_2(group)))
    n_hblocks = triton.cdiv(group, block_h)
    block_n = 64
    splits = _num_splits(batch, num_kv_heads * n_hblocks)
    if max_seq_len is not None:  # powers of two, as the heuristic gives
        splits = min(splits, 1 << (max_splits_for(max_seq_len, block_n).bit_length() - 1))
    part_acc = part_ml = out  # unused with one split
    if splits > 1:
        part_acc = torch.empty(batch * num_heads * splits, da, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(batch * num_heads * splits, 2, dtype=torch.float32, device=q.device)
    _decode_kernel[(num_kv_heads * n_hblocks, batch, splits)](
        q, kv_cache, block_tables, seq_lens, part_acc, part_ml, out, scale,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1), K_COMP=k_comp, V_COMP=v_comp, GROUP=group,
        BLOCK_H=block_h, DA=da, DB=db, PAGE=kv_cache.shape[2], BLOCK_N=block_n, NUM_SPLITS=splits,
        NUM_HEADS=num_heads, BLOCK_DB=_block_db(db))
    if splits > 1:
        _merge_kernel[(batch, num_heads)](part_acc, part_ml, out, out.stride(0), out.stride(1), DA=da,
                                          NUM_SPLITS=splits, NUM_HEADS=num_heads)


@triton.jit(do_not_specialize=["seq_offset"])  # a mixed step's decode count: one compile for every offset
def _prefill_kernel(q, kv, block_tables, seq_lens, query_start, out, scale, seq_offset,
                    stride_qt, stride_qh, stride_kp, stride_kc, stride_ks, stride_kh, stride_bt,
                    stride_ot, stride_oh,
                    K_COMP: tl.constexpr, V_COMP: tl.constexpr, GROUP: tl.constexpr, DA: tl.constexpr,
                    DB: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_DB: tl.constexpr):
    b = tl.program_id(0) + seq_offset
    h = tl.program_id(1)
    mb = tl.program_id(2)
    q_start = tl.load(query_start + b)
    q_len = tl.load(query_start + b + 1) - q_start
    seq_len = tl.load(seq_lens + b)
    ctx = seq_len - q_len
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < q_len
    q_pos = ctx + offs_m
    kvh = h // GROUP
    da = tl.arange(0, DA)
    q_row = q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh
    qa = tl.load(q_row + da[None, :], mask=mmask[:, None], other=0.0)
    if DB > 0:
        db = tl.arange(0, BLOCK_DB)
        qb = tl.load(q_row + DA + db[None, :], mask=mmask[:, None] & (db < DB)[None, :], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DA], tl.float32)
    end = tl.where(mb * BLOCK_M < q_len, tl.minimum(seq_len, ctx + (mb + 1) * BLOCK_M), 0)
    if DB == 0:
        qb = qa
    for n0 in range(0, end, BLOCK_N):
        pos, pmask, qk, v = _load_block(kv, block_tables, b * stride_bt, kvh, n0, end, qa, qb, stride_kp, stride_kc,
                                        stride_ks, stride_kh, K_COMP, V_COMP, DA, DB, PAGE, BLOCK_N,
                                        BLOCK_DB)
        causal = (pos[None, :] <= q_pos[:, None]) & pmask[None, :]
        qk = tl.where(causal, qk * scale, float("-inf"))
        m, l, acc = _online_softmax(qk, v, m, l, acc)
    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    o_ptr = out + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + da[None, :]
    tl.store(o_ptr, o.to(out.dtype.element_ty), mask=mmask[:, None])


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                      query_start_loc: torch.Tensor, first_seq: int, num_seqs: int, max_query_len: int, scale: float,
                      k_comp: int, v_comp: int, da: int, db: int, out: torch.Tensor) -> None:
    """Sequences `first_seq .. first_seq+num_seqs` of the varlen batch; q/out are the whole batch."""
    num_heads = q.shape[1]
    group = num_heads // kv_cache.shape[3]
    wide = da + db > 256
    block_m = 16 if wide else 64
    block_n = 16 if wide else 64
    if q.device.type == "cpu":  # interpreter: small tiles keep it quick
        block_m = block_n = 16
    grid = (num_seqs, num_heads, triton.cdiv(max_query_len, block_m))
    _prefill_kernel[grid](
        q, kv_cache, block_tables, seq_lens, query_start_loc, out, scale, first_seq,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1), K_COMP=k_comp, V_COMP=v_comp, GROUP=group,
        DA=da, DB=db, PAGE=kv_cache.shape[2], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DB=_block_db(db))
