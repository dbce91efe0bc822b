"""Triton fused-MoE expert computation: `fused_experts(hidden, w13, w2, topk_weights, topk_ids)`
with the contract of `fused_moe_ref.fused_experts_ref`.

Token-expert pairs ("slots", `T*k` of them) are grouped by expert into blocks of BLOCK_M rows
(`align_by_expert` in `moe_routing.py`, no host sync); a grouped GEMM kernel then runs one program
per (block, N tile) reading only that block's expert weights, so every touched expert's weights
are read once per N tile and untouched experts not at all. Stage 1 computes `x @ w13[e]^T` per
slot, `silu(gate) * up` follows, stage 2 computes `act @ w2[e]^T` scaled by the routing weight,
and one combine kernel sums the k slots of each token (plus the shared experts' output when given,
after rounding the routed sum, as `routed + shared` in torch). Batches of up to
`moe_decode.MAX_TOKENS` tokens take `moe_decode.decode_experts` instead (no alignment, SiLU and
combine in the GEMV epilogues). Launch shapes depend only on T (CUDA-graph safe); the
programs of unused blocks return at once. Slots with an expert id outside `[0, E)` (experts on
another rank) are never scheduled and contribute zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.kernels import moe_decode
from engine.kernels.moe_routing import align_by_expert
from engine.kernels.norm_act import silu_and_mul


@triton.jit
def _slot_tile(sorted_slots, num_slots, n_out, TOP_K: tl.constexpr, A_PER_TOKEN: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """What one grouped-GEMM program (block of one expert's sorted slots, tile of output columns) works
    on: its slots and which are real, the activation row each reads (its token's, or its own), its
    output columns and which exist, and the K offsets of one step. Shared by the bf16 and FP8 kernels."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots + rows)
    row_ok = slots < num_slots
    a_rows = slots // TOP_K if A_PER_TOKEN else slots
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return slots, row_ok, a_rows, offs_n, offs_n < n_out, tl.arange(0, BLOCK_K)


@triton.jit(do_not_specialize=['num_slots'])  # token counts: one compile for every step size
def _grouped_gemm_kernel(a, b, c, weights, sorted_slots, block_expert, num_slots, n_out, k_in,
                         stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                         TOP_K: tl.constexpr, A_PER_TOKEN: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.load(block_expert + tl.program_id(0))
    if e < 0:
        return
    slots, row_ok, a_rows, offs_n, n_ok, offs_k = _slot_tile(sorted_slots, num_slots, n_out, TOP_K, A_PER_TOKEN,
                                                             BLOCK_M, BLOCK_N, BLOCK_K)
    a_ptr = a + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptr = b + e.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k_ok = (k0 + offs_k) < k_in
        x = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(x, w, out_dtype=tl.float32)
        a_ptr += BLOCK_K * stride_ak
        b_ptr += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        acc = acc * tl.load(weights + slots, mask=row_ok, other=0.0)[:, None]
    c_ptr = c + slots[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptr, acc.to(c.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(down, ids, shared, out, hidden, num_experts, stride_d, stride_s, stride_o, TOP_K: tl.constexpr,
                    BLOCK: tl.constexpr, HAS_SHARED: tl.constexpr):
    """out[t] = sum of token t's k slot rows of `down` (float32, rounded once) (+ shared[t]); slots
    with an expert outside [0, E) were never written and are skipped."""
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < hidden
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids + t * TOP_K + j) + n * 0
        ok = n_ok & (e >= 0) & (e < num_experts)
        acc += tl.load(down + (t * TOP_K + j) * stride_d + n, mask=ok, other=0.0).to(tl.float32)
    y = acc.to(out.dtype.element_ty)
    if HAS_SHARED:
        y = (y.to(tl.float32) + tl.load(shared + t * stride_s + n, mask=n_ok, other=0.0).to(tl.float32))
        y = y.to(out.dtype.element_ty)
    tl.store(out + t * stride_o + n, y, mask=n_ok)


def _tiles(num_slots: int, num_experts: int, on_cpu: bool):
    if on_cpu:
        return 16, 32, 32
    per_expert = num_slots / max(1, num_experts)
    if per_expert <= 16:
        return 16, 64, 128
    if per_expert <= 64:
        return 32, 64, 64
    return 64, 128, 64


def _launch_config(num_slots: int, num_experts: int, on_cpu: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the bf16 grouped GEMM. Prefill sizes (≥ 128
    slots per expert) take the 128×256×64 tile with 8 warps and 4 stages that vLLM's tuning found
    best for DeepSeek-V2-Lite's experts (E=64, I=1408) at 2k-32k tokens on an H100; smaller batches
    keep `_tiles` (shared with the FP8 kernel) at Triton's default 4 warps, 3 stages."""
    if not on_cpu and num_slots >= 128 * max(1, num_experts):
        return 128, 256, 64, 8, 4
    return (*_tiles(num_slots, num_experts, on_cpu), 4, 3)


def _grouped_gemm(a, w, out, weights, sorted_slots, block_expert, num_slots, top_k, a_per_token, mul_weight,
                  tiles):
    bm, bn, bk, warps, stages = tiles
    n_out, k_in = w.shape[1], w.shape[2]
    grid = (block_expert.numel(), triton.cdiv(n_out, bn))
    _grouped_gemm_kernel[grid](
        a, w, out, weights, sorted_slots, block_expert, num_slots, n_out, k_in,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        TOP_K=top_k, A_PER_TOKEN=a_per_token, MUL_WEIGHT=mul_weight, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages)


def fused_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, shared_output: torch.Tensor | None = None,
                  shared_weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    t, k = topk_ids.shape
    if t <= moe_decode.MAX_TOKENS:
        return moe_decode.decode_experts(hidden, w13, w2, topk_weights, topk_ids, shared_output, shared_weights)
    if shared_weights is not None:
        sw13, sw2 = shared_weights
        shared_output = F.linear(silu_and_mul(F.linear(hidden, sw13)), sw2)
    num_experts, two_i, h = w13.shape
    num_slots = t * k
    tiles = _launch_config(num_slots, num_experts, hidden.device.type == "cpu")
    ids = topk_ids.to(torch.int32).contiguous()
    sorted_slots, block_expert = align_by_expert(ids, num_experts, tiles[0])
    hidden = hidden.contiguous()
    gate_up = torch.empty(num_slots, two_i, dtype=hidden.dtype, device=hidden.device)
    flat_w = topk_weights.reshape(-1).float().contiguous()
    _grouped_gemm(hidden, w13, gate_up, flat_w, sorted_slots, block_expert, num_slots, k, True, False, tiles)
    act = silu_and_mul(gate_up)
    down = torch.empty(num_slots, h, dtype=hidden.dtype, device=hidden.device)  # unrouted rows: never read
    _grouped_gemm(act, w2, down, flat_w, sorted_slots, block_expert, num_slots, 1, False, True, tiles)
    out = torch.empty_like(hidden)
    has_shared = shared_output is not None
    shared = shared_output.contiguous() if has_shared else out
    block = min(1024, triton.next_power_of_2(h))
    _combine_kernel[(t, triton.cdiv(h, block))](down, ids, shared, out, h, num_experts, down.stride(0),
                                               shared.stride(0), out.stride(0), TOP_K=k, BLOCK=block,
                                               HAS_SHARED=has_shared)
    return out
