"""MLA decode attention (DeepSeek's weight-absorbed form) over the paged latent pool, and its torch
reference with the same signature.

Every query head attends over one shared cached entry per token: the compressed latent (R =
kv_lora_rank channels) followed by the rope key (P channels), stored as component 0, KV head 0 of
the pool `[num_pages, 1, page_size, 1, R + P]`; the value is the latent itself. With many heads
(DeepSeek-V3: 128) the work is two matmuls per tile of positions, so the kernel is built like
FlashMLA: one program owns a block of up to 64 heads of one sequence and streams that sequence's
latent pages once, feeding each tile to both dots (scores against latent + rope, then
probabilities times latent). 128 heads make two head blocks; they are adjacent in the grid, run
side by side and share each tile through L2, so HBM reads stay ≈ 1× the latent bytes.

Split-KV: the grid is (head blocks × value splits, splits, batch), with the split count a function of the batch
size and SM count only; each program stops at its sequence's length, so the launch shape is fixed
per batch size and the kernel runs under CUDA graph capture. With one split the kernel writes the
output directly; otherwise each split stores its normalised output and log-sum-exp and a second
kernel merges them. Accumulation is float32; inputs and output are the pool's dtype.

At 128 heads the work is compute-bound (~240 FLOPs per cached byte, above the H200's ridge).
With 8 warps Triton gives both warpgroups all 64 head rows of the scores (its layout for chained
dots), so the score dot runs twice; `value_splits=2` instead runs one warpgroup per program on
half the output channels (scores in full, once per program), which 4 warps can hold. See
bench/results/2026-11-29_h200_mla_decode.md for what was measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class MLADecodeConfig:
    block_h: int  # query heads per program (the M of both dots)
    block_n: int  # cached positions per tile
    num_splits: int  # programs per (sequence, head block) along the sequence
    num_warps: int
    num_stages: int
    value_splits: int = 1  # 2: each program accumulates half the latent channels (scores in full)


@triton.jit
def _attend_tile(q_own, q_rest, q_rope, kv, block_tables, row_table, n0, end, qk_scale, m, l, acc, own0, rest0,
                 stride_kp, stride_ks, R: tl.constexpr, P: tl.constexpr, PAGE: tl.constexpr,
                 BLOCK_N: tl.constexpr, VALUE_SPLITS: tl.constexpr, BLOCK_P: tl.constexpr):
    """Scores of the head block against positions n0..n0+BLOCK_N (< end), then one online-softmax
    update of (running max, running sum, unnormalised output), all in the exp2 domain. The scores
    use all R latent channels (this program's `own0..` slice and, with two value splits, the
    `rest0..` one) plus the rope channels; the output accumulates the own slice only."""
    RV: tl.constexpr = R // VALUE_SPLITS
    pos = n0 + tl.arange(0, BLOCK_N)
    pmask = pos < end
    page = tl.load(block_tables + row_table + pos // PAGE, mask=pmask, other=0).to(tl.int64)
    row = kv + page * stride_kp + (pos % PAGE) * stride_ks
    cols = tl.arange(0, RV)
    # An FP8 cache (scale 1) is read in the query's dtype (a no-op for a bf16 cache).
    lat = tl.load(row[:, None] + own0 + cols[None, :], mask=pmask[:, None], other=0.0).to(q_own.dtype)
    pc = tl.arange(0, BLOCK_P)  # BLOCK_P ≥ 16 (a tensor-core dot's K), masked to P
    rope = tl.load(row[:, None] + R + pc[None, :], mask=pmask[:, None] & (pc < P)[None, :], other=0.0).to(q_rope.dtype)
    qk = tl.dot(q_own, tl.trans(lat), out_dtype=tl.float32)
    if VALUE_SPLITS == 2:
        rest = tl.load(row[:, None] + rest0 + cols[None, :], mask=pmask[:, None], other=0.0).to(q_rest.dtype)
        qk = tl.dot(q_rest, tl.trans(rest), acc=qk, out_dtype=tl.float32)
    qk = tl.dot(q_rope, tl.trans(rope), acc=qk, out_dtype=tl.float32)
    qk = tl.where(pmask[None, :], qk * qk_scale, float("-inf"))
    # Position n0 < end is always valid, so m_new is finite and exp2(-inf - m_new) = 0.
    m_new = tl.maximum(m, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, out_dtype=tl.float32)
    return m_new, l, acc


@triton.jit
def _mla_decode_kernel(q, kv, block_tables, seq_lens, out, part_out, part_lse, qk_scale, num_heads, num_splits,
                       stride_qb, stride_qh, stride_kp, stride_ks, stride_bt, stride_ob, stride_oh,
                       R: tl.constexpr, P: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_N: tl.constexpr, VALUE_SPLITS: tl.constexpr, DIRECT: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    # Fastest grid axis: the (head block, value split) programs sharing one latent tile run together.
    hb = tl.program_id(0) // VALUE_SPLITS
    vs = tl.program_id(0) % VALUE_SPLITS
    s = tl.program_id(1)
    b = tl.program_id(2)
    RV: tl.constexpr = R // VALUE_SPLITS
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < num_heads
    seq_len = tl.load(seq_lens + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = s * chunk
    end = tl.minimum(start + chunk, seq_len)
    own0 = vs * RV
    rest0 = (1 - vs) * RV  # the other half when VALUE_SPLITS == 2 (unused otherwise)
    r = own0 + tl.arange(0, RV)
    q_row = q + b * stride_qb + heads[:, None] * stride_qh
    q_own = tl.load(q_row + r[None, :], mask=hmask[:, None], other=0.0)
    q_rest = q_own
    if VALUE_SPLITS == 2:
        q_rest = tl.load(q_row + rest0 + tl.arange(0, RV)[None, :], mask=hmask[:, None], other=0.0)
    pc = tl.arange(0, BLOCK_P)
    q_rope = tl.load(q_row + R + pc[None, :], mask=hmask[:, None] & (pc < P)[None, :], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, RV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        m, l, acc = _attend_tile(q_own, q_rest, q_rope, kv, block_tables, b * stride_bt, n0, end, qk_scale, m, l,
                                 acc, own0, rest0, stride_kp, stride_ks, R, P, PAGE, BLOCK_N, VALUE_SPLITS,
                                 BLOCK_P)
    l_safe = tl.where(l > 0, l, 1.0)  # an empty split (or sequence) gives zeros
    o = acc / l_safe[:, None]
    if DIRECT:
        o_ptr = out + b * stride_ob + heads[:, None] * stride_oh + r[None, :]
        tl.store(o_ptr, o.to(out.dtype.element_ty), mask=hmask[:, None])
    else:
        prow = (b * num_heads + heads) * num_splits + s  # partials are [B, H, splits, R]
        tl.store(part_out + prow[:, None] * R + r[None, :], o, mask=hmask[:, None])
        lse = tl.where(l > 0, m + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse + prow, lse, mask=hmask & (heads * 0 + vs == 0))


@triton.jit
def _combine_kernel(part_out, part_lse, out, num_heads, num_splits, stride_ob, stride_oh,
                    R: tl.constexpr, SPLITS: tl.constexpr):
    """Log-sum-exp merge of one (sequence, head)'s split outputs."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    smask = s < num_splits
    prow = (b * num_heads + h) * num_splits + s
    lse = tl.load(part_lse + prow, mask=smask, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - top), 0.0)
    r = tl.arange(0, R)
    o = tl.load(part_out + prow[:, None] * R + r[None, :], mask=smask[:, None], other=0.0)
    total = tl.sum(w, 0)
    merged = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out + b * stride_ob + h * stride_oh + r, merged.to(out.dtype.element_ty))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few splits so the merge path is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


# (positions per tile, warps, stages, value splits) per heads-per-program, the fastest at batch
# 16-128 in bench/mla_decode_sweep.py on an H200 (4k context; results/2026-11-29_h200_mla_decode.md).
_TILES = {64: (64, 8, 3, 1), 32: (64, 4, 2, 1), 16: (128, 8, 2, 1)}


# A split covers at least this many tiles of positions: below it, the split's fixed cost and the merge
# launch outweigh the parallel reads (decode_attention holds its splits to the same bound).
MIN_TILES_PER_SPLIT = 4


def max_splits_for(max_seq_len: int | None, block_n: int) -> int:
    """The most splits worth a step whose longest sequence is `max_seq_len` (None: unbounded). A CUDA
    graph is captured with its bound (engine/cuda_graph.py: the model's limit, or a short-context
    bound whose graphs are replayed only while every sequence fits it), so the launch stays static."""
    if max_seq_len is None:
        return 1 << 30
    return max(1, triton.cdiv(max_seq_len, MIN_TILES_PER_SPLIT * block_n))


def choose_config(batch: int, num_heads: int, device: torch.device, max_seq_len: int | None = None) -> MLADecodeConfig:
    """A function of static shapes (and the step's context bound) only, so a captured CUDA graph keeps
    its launch. Splits fill the SMs about once with one program each (more only adds merge traffic),
    and each covers at least `MIN_TILES_PER_SPLIT` tiles of the longest sequence."""
    block_h = 16 if num_heads <= 16 else 32 if num_heads <= 32 else 64
    if device.type != "cuda":  # interpreter: small tiles keep it quick
        return MLADecodeConfig(block_h, 16, min(3, _num_sms(device), max_splits_for(max_seq_len, 4)), 4, 1)
    block_n, warps, stages, value_splits = _TILES[block_h]
    programs_per_seq = triton.cdiv(num_heads, block_h) * value_splits
    splits = max(1, min(32, _num_sms(device) // (batch * programs_per_seq), max_splits_for(max_seq_len, block_n)))
    return MLADecodeConfig(block_h, block_n, splits, warps, stages, value_splits)


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               scale: float, v_dim: int, out: torch.Tensor | None = None,
               config: MLADecodeConfig | None = None, max_seq_len: int | None = None) -> torch.Tensor:
    """q `[B, H, R + P]` (one query per sequence) over the cached entries → `[B, H, R]` (R = v_dim).

    `kv_cache` is one layer's pool `[num_pages, 1, page_size, 1, R + P]`, `block_tables[b]` the
    page ids of sequence b and `seq_lens[b] ≥ 1` its cached length (this step's entry included).
    `max_seq_len`: a bound on every `seq_lens[b]` (fewer splits below it), None if unknown.
    """
    batch, num_heads, width = q.shape
    rope = width - v_dim
    if kv_cache.shape[1] != 1 or kv_cache.shape[3] != 1 or kv_cache.shape[4] != width:
        raise ValueError(f"MLA decode needs a pool [pages, 1, page, 1, {width}], got {tuple(kv_cache.shape)}")
    if kv_cache.stride(4) != 1 or q.stride(2) != 1:
        raise ValueError("MLA decode needs the pool's and q's last dimension contiguous")
    if out is None:
        out = torch.empty(batch, num_heads, v_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    cfg = config or choose_config(batch, num_heads, q.device, max_seq_len)
    head_blocks = triton.cdiv(num_heads, cfg.block_h)
    direct = cfg.num_splits == 1
    if direct:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(batch * num_heads * cfg.num_splits, v_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch * num_heads * cfg.num_splits, dtype=torch.float32, device=q.device)
    if cfg.value_splits not in (1, 2):
        raise ValueError(f"MLA decode supports 1 or 2 value splits, got {cfg.value_splits}")
    _mla_decode_kernel[(head_blocks * cfg.value_splits, cfg.num_splits, batch)](
        q, kv_cache, block_tables, seq_lens, out, part_out, part_lse, scale * LOG2E, num_heads, cfg.num_splits,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), R=v_dim, P=rope, PAGE=kv_cache.shape[2], BLOCK_H=cfg.block_h,
        BLOCK_N=cfg.block_n, VALUE_SPLITS=cfg.value_splits, DIRECT=direct,
        BLOCK_P=max(16, triton.next_power_of_2(rope)), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    if not direct:
        _combine_kernel[(batch, num_heads)](part_out, part_lse, out, num_heads, cfg.num_splits, out.stride(0),
                                            out.stride(1), R=v_dim, SPLITS=triton.next_power_of_2(cfg.num_splits))
    return out


def mla_decode_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   scale: float, v_dim: int, out: torch.Tensor | None = None,
                   config: MLADecodeConfig | None = None) -> torch.Tensor:
    """Torch reference of `mla_decode` (float32 math, a loop over sequences); `config` is ignored."""
    page_size = kv_cache.shape[2]
    if out is None:
        out = torch.empty(q.shape[0], q.shape[1], v_dim, dtype=q.dtype, device=q.device)
    for b, seq_len in enumerate(seq_lens.tolist()):
        pages = block_tables[b, : -(-seq_len // page_size)].long()
        entries = kv_cache[pages, 0, :, 0].reshape(-1, kv_cache.shape[-1])[:seq_len].float()  # [S, R + P]
        probs = (q[b].float() @ entries.T * scale).softmax(dim=-1)  # [H, S]
        out[b] = (probs @ entries[:, :v_dim]).to(out.dtype)
    return out
