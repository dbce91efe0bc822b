"""Triton MoE routing and expert alignment with the contracts of `moe_routing_ref.py`.

Router logits (`router_logits`, decode sizes): one kernel computing the float32 logits from the
activation-dtype hidden states, where torch runs a cast to float32 and cuBLAS's GEMV (two kernels).

Routing: one program per token holds its E router logits as a `[groups, E/groups]` tile, scores
them (softmax or sigmoid), adds the correction bias, keeps the best `topk_groups` groups (by best
or top-2-sum score), then picks the top k by repeated arg-max (ties go to the lowest expert id),
renormalises and scales: one kernel where torch runs ~15 (softmax, topk, scatter, masked_fill,
gather, sum, div, ...).

Alignment: three kernels over fixed-size chunks of the `T*k` slots (no atomics, so the slot order
within each expert is the slot order, like the reference's stable sort): per-chunk expert counts
and each slot's rank within its chunk; one program scanning the counts into block starts, the
per-block expert ids and the padding; a scatter of each slot to its place. Shapes depend only on
T (CUDA-graph safe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.pdl import signal_then_wait
from engine.kernels.moe_routing_ref import padded_slots


@triton.jit
def _route_kernel(logits, bias, w_out, id_out, stride_l, scale,
                  E: tl.constexpr, G: tl.constexpr, EG: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_EG: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                  SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, TOP2SUM: tl.constexpr,
                  RENORM: tl.constexpr, FILL_NEG_INF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_EG)[None, :]
    e = g * EG + j
    ok = (g < G) & (j < EG)
    neg = float("-inf")
    x = tl.load(logits + t * stride_l + e, mask=ok, other=neg).to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        ex = tl.exp(x - tl.max(tl.max(x, axis=1), axis=0))
        scores = ex / tl.sum(tl.sum(ex, axis=1), axis=0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias + e, mask=ok, other=0.0).to(tl.float32)
    choice = tl.where(ok, choice, neg)
    big = BLOCK_G * BLOCK_EG
    if G > 1:
        best = tl.max(choice, axis=1)  # [BLOCK_G]
        if TOP2SUM:
            first = tl.min(tl.where(choice == best[:, None], j, big), axis=1)
            best = best + tl.max(tl.where(j == first[:, None], neg, choice), axis=1)
        gi = tl.arange(0, BLOCK_G)
        best = tl.where(gi < G, best, neg)
        keep = gi < 0
        for _ in tl.static_range(TOPK_GROUPS):
            m = tl.max(best, axis=0)
            pick = tl.min(tl.where(best == m, gi, big), axis=0)
            keep = keep | (gi == pick)
            best = tl.where(gi == pick, neg, best)
        fill = neg if FILL_NEG_INF else 0.0
        choice = tl.where(keep[:, None] | ~ok, choice, fill)
    wsum = 0.0
    ko = tl.arange(0, BLOCK_K)
    ws = tl.zeros([BLOCK_K], tl.float32)
    ids = tl.zeros([BLOCK_K], tl.int32)
    for i in tl.static_range(TOP_K):
        m = tl.max(tl.max(choice, axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(choice == m, e, big), axis=1), axis=0)
        w = tl.sum(tl.sum(tl.where(e == pick, scores, 0.0), axis=1), axis=0)
        wsum += w
        ws = tl.where(ko == i, w, ws)
        ids = tl.where(ko == i, pick, ids)
        choice = tl.where(e == pick, neg, choice)
    if RENORM:
        ws = ws / (wsum + 1e-20)
    tl.store(w_out + t * TOP_K + ko, ws * scale, mask=ko < TOP_K)
    tl.store(id_out + t * TOP_K + ko, ids, mask=ko < TOP_K)


def select_experts(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = False,
                   num_groups: int = 1, topk_groups: int = 1, correction_bias: torch.Tensor | None = None,
                   routed_scaling_factor: float = 1.0, group_score: str = "max"):
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown MoE scoring function {scoring!r}")
    t, e = router_logits.shape
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    if t:
        eg = e // num_groups
        _route_kernel[(t,)](
            logits, correction_bias if correction_bias is not None else logits, weights, ids, logits.stride(0),
            float(routed_scaling_factor), E=e, G=num_groups, EG=eg, BLOCK_G=triton.next_power_of_2(num_groups),
            BLOCK_EG=triton.next_power_of_2(eg), TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
            TOPK_GROUPS=topk_groups if num_groups > 1 else 1,
            SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None, TOP2SUM=group_score == "top2sum",
            RENORM=renormalize, FILL_NEG_INF=correction_bias is not None, num_warps=1 if e <= 128 else 2)
    return weights, ids


ROUTER_GEMV_MAX_TOKENS = 4  # larger batches take cuBLAS (a GEMM, no longer a bandwidth-bound GEMV)


@triton.jit
def _router_logits_kernel(x, w, out, t, hidden, e, stride_x, stride_w, stride_o, BLOCK_T: tl.constexpr,
                          BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """One program per BLOCK_E experts, all T (≤ BLOCK_T) tokens: float32 dot products of the
    widened activations with the float32 router rows. The first K step's router rows are loaded before
    waiting for the kernel before (engine/kernels/pdl.py)."""
    rows = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    toks = tl.arange(0, BLOCK_T)
    kk = tl.arange(0, BLOCK_K)
    r_ok, t_ok = rows < e, toks < t
    w_ptr = w + rows.to(tl.int64)[:, None] * stride_w + kk[None, :]
    wv = tl.load(w_ptr, mask=r_ok[:, None] & (kk < hidden)[None, :], other=0.0)
    signal_then_wait(USE_PDL)
    acc = tl.zeros([BLOCK_T, BLOCK_E, BLOCK_K], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = (k0 + kk) < hidden
        if k0 > 0:
            wv = tl.load(w_ptr + k0, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        xv = tl.load(x + toks[:, None] * stride_x + k0 + kk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        acc += xv.to(tl.float32)[:, None, :] * wv.to(tl.float32)[None, :, :]
    tl.store(out + toks[:, None] * stride_o + rows[None, :], tl.sum(acc, axis=2), mask=t_ok[:, None] & r_ok[None, :])


def router_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`moe_routing_ref.router_logits` in one kernel at decode sizes (where torch runs a cast and
    cuBLAS's two-kernel GEMV); cuBLAS above `ROUTER_GEMV_MAX_TOKENS` tokens."""
    t, h = hidden.shape
    if t > ROUTER_GEMV_MAX_TOKENS or hidden.stride(-1) != 1 or weight.stride(-1) != 1:
        return torch.nn.functional.linear(hidden.float(), weight.float())
    e = weight.shape[0]
    out = torch.empty((t, e), dtype=torch.float32, device=hidden.device)
    if t:
        on_cpu = hidden.device.type == "cpu"
        # On GPU one router row per program (E programs) in two or so K steps: a few µs of latency, not bytes
        block_e, block_k = (8, 32) if on_cpu else (1, 1024)
        _router_logits_kernel[(triton.cdiv(e, block_e),)](
            hidden, weight, out, t, h, e, hidden.stride(0), weight.stride(0), out.stride(0),
            BLOCK_T=triton.next_power_of_2(t), BLOCK_E=block_e, BLOCK_K=block_k, num_warps=4,
            **pdl.launch_args(hidden.device))
    return out


CHUNK = 64  # slots per program in the alignment kernels


@triton.jit(do_not_specialize=['n'])  # token counts: one compile for every step size
def _chunk_count_kernel(ids, chunk_counts, local_rank, n, E: tl.constexpr, BLOCK_E: tl.constexpr,
                        CHUNK: tl.constexpr):
    c = tl.program_id(0)
    s = c * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids + s, mask=s < n, other=-1)
    e = tl.where((e >= 0) & (e < E), e, -1)
    # rank of each slot among the earlier slots of this chunk routed to the same expert
    same = (e[:, None] == e[None, :]) & (tl.arange(0, CHUNK)[None, :] < tl.arange(0, CHUNK)[:, None])
    tl.store(local_rank + s, tl.sum(same.to(tl.int32), axis=1), mask=s < n)
    ex = tl.arange(0, BLOCK_E)
    counts = tl.sum((e[:, None] == ex[None, :]).to(tl.int32), axis=0)
    tl.store(chunk_counts + c * BLOCK_E + ex, counts)


@triton.jit(do_not_specialize=['n', 'num_chunks', 'num_blocks', 'max_padded'])  # token counts: one compile for every step size
def _scan_kernel(chunk_counts, chunk_base, expert_start, sorted_slots, block_expert, n, num_chunks, num_blocks,
                 max_padded, E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    ex = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):  # running per-expert offset of each chunk, BLOCK_C chunks at a time
        c = c0 + tl.arange(0, BLOCK_C)
        at = c[:, None] * BLOCK_E + ex[None, :]
        rows = tl.load(chunk_counts + at, mask=(c < num_chunks)[:, None], other=0)
        inclusive = tl.cumsum(rows, axis=0)
        tl.store(chunk_base + at, inclusive - rows + counts[None, :], mask=(c < num_chunks)[:, None])
        counts += tl.sum(rows, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded = tl.where(ex < E, padded, 0)
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(expert_start + ex, starts)
    ends = tl.where(ex < E, ends, 2147483647)
    for b0 in range(0, num_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        expert = tl.sum((ends[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert + b, tl.where(expert < E, expert, -1), mask=b < num_blocks)
    for p0 in range(0, max_padded, 1024):
        p = p0 + tl.arange(0, 1024)
        tl.store(sorted_slots + p, tl.zeros([1024], tl.int32) + n, mask=p < max_padded)


@triton.jit(do_not_specialize=['n'])  # token counts: one compile for every step size
def _scatter_kernel(ids, chunk_base, expert_start, local_rank, sorted_slots, n, E: tl.constexpr, BLOCK_E: tl.constexpr,
                    CHUNK: tl.constexpr):
    c = tl.program_id(0)
    s = c * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids + s, mask=s < n, other=-1)
    ok = (s < n) & (e >= 0) & (e < E)
    base = tl.load(expert_start + e, mask=ok, other=0) + tl.load(chunk_base + c * BLOCK_E + e, mask=ok, other=0)
    rank = tl.load(local_rank + s, mask=ok, other=0)
    tl.store(sorted_slots + base + rank, s, mask=ok)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    flat = topk_ids.reshape(-1)
    if flat.dtype != torch.int32:
        flat = flat.to(torch.int32)
    flat = flat.contiguous()
    n = flat.numel()
    dev = flat.device
    max_padded = padded_slots(n, num_experts, block_m)
    num_blocks = max_padded // block_m
    num_chunks = triton.cdiv(n, CHUNK)
    block_e = triton.next_power_of_2(num_experts)
    chunk_counts = torch.empty((max(num_chunks, 1), block_e), dtype=torch.int32, device=dev)
    chunk_base = torch.empty_like(chunk_counts)
    expert_start = torch.empty(block_e, dtype=torch.int32, device=dev)
    local_rank = torch.empty(max(n, 1), dtype=torch.int32, device=dev)
    sorted_slots = torch.empty(max_padded, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    if num_chunks:
        _chunk_count_kernel[(num_chunks,)](flat, chunk_counts, local_rank, n, E=num_experts, BLOCK_E=block_e,
                                           CHUNK=CHUNK, num_warps=8)
    _scan_kernel[(1,)](chunk_counts, chunk_base, expert_start, sorted_slots, block_expert, n, num_chunks, num_blocks,
                       max_padded, E=num_experts, BLOCK_E=block_e, BLOCK_M=block_m, BLOCK_B=64,
                       BLOCK_C=max(1, min(32, 4096 // block_e)), num_warps=4)
    if num_chunks:
        _scatter_kernel[(num_chunks,)](flat, chunk_base, expert_start, local_rank, sorted_slots, n, E=num_experts,
                                       BLOCK_E=block_e, CHUNK=CHUNK)
    return sorted_slots, block_expert
