"""Triton fused MoE with block-scaled FP8 experts: `fused_experts_fp8(...)` with the contract of
`fp8_ref.fused_experts_fp8_ref` (shared experts included). Batches of up to `moe_decode.MAX_TOKENS`
tokens take `moe_decode.decode_experts_fp8` (two kernels, activations quantized inside them).

The same schedule as `fused_moe.py` (token-expert slots grouped by expert with
`align_by_expert`, one program per (block of slots, N tile), CUDA-graph-safe launch shapes), with
FP8 operands: the tokens are quantized once per token and `bk` columns before stage 1, the
`silu(gate) * up` activations once per slot before stage 2, and each K step of the grouped GEMM
adds `dot(a, w) * a_scale[row] * w_scale[expert, n // bn, k // bk]` in float32. With
`quantize_activations=False` the expert tile is dequantized in registers instead (weight-only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.kernels import moe_decode
from engine.kernels.fp8_gemm import fp8_block_gemm, quantize_activation
from engine.kernels.fused_moe import _slot_tile, _tiles, align_by_expert
from engine.kernels.norm_act import silu_and_mul


@triton.jit(do_not_specialize=['num_slots'])  # token counts: one compile for every step size
def _grouped_fp8_gemm_kernel(a, a_scale, b, b_scale, c, weights, sorted_slots, block_expert, num_slots, n_out, k_in,
                             stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm,
                             SCALE_ROWS: tl.constexpr, A_FP8: tl.constexpr, TOP_K: tl.constexpr,
                             A_PER_TOKEN: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.load(block_expert + tl.program_id(0))
    if e < 0:
        return
    slots, row_ok, a_rows, offs_n, n_ok, offs_k = _slot_tile(sorted_slots, num_slots, n_out, TOP_K, A_PER_TOKEN,
                                                             BLOCK_M, BLOCK_N, BLOCK_K)
    a_ptr = a + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptr = b + e.to(tl.int64) * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    bs_ptr = b_scale + e.to(tl.int64) * stride_bse + (offs_n // SCALE_ROWS) * stride_bsn
    as_ptr = a_scale + a_rows * stride_asm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, tl.cdiv(k_in, BLOCK_K)):
        k_ok = offs_k < k_in - kb * BLOCK_K
        x = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        ws = tl.load(bs_ptr + kb, mask=n_ok, other=0.0)
        if A_FP8:
            xs = tl.load(as_ptr + kb, mask=row_ok, other=0.0)
            acc += tl.dot(x, w) * xs[:, None] * ws[None, :]
        else:
            acc += tl.dot(x, (w.to(tl.float32) * ws[None, :]).to(x.dtype))
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    if MUL_WEIGHT:
        acc = acc * tl.load(weights + slots, mask=row_ok, other=0.0)[:, None]
    c_ptr = c + slots[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptr, acc.to(c.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _stage(x, w, w_scale, out, flat_w, sorted_slots, block_expert, num_slots, top_k, a_per_token, mul_weight,
           block_size, quantize_activations, tiles):
    bn, bk = block_size
    if quantize_activations:
        a, a_scale = quantize_activation(x, bk)
    else:
        a, a_scale = x, flat_w.view(-1, 1)  # a_scale unused
    bm, tile_n, _ = tiles
    n_out, k_in = w.shape[1], w.shape[2]
    grid = (block_expert.numel(), triton.cdiv(n_out, tile_n))
    _grouped_fp8_gemm_kernel[grid](
        a, a_scale, w, w_scale, out, flat_w, sorted_slots, block_expert, num_slots, n_out, k_in,
        a.stride(0), a_scale.stride(0), w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1),
        out.stride(0), SCALE_ROWS=bn, A_FP8=quantize_activations, TOP_K=top_k, A_PER_TOKEN=a_per_token,
        MUL_WEIGHT=mul_weight, BLOCK_M=bm, BLOCK_N=tile_n, BLOCK_K=bk)


def fused_experts_fp8(hidden: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                      w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      block_size: tuple[int, int], quantize_activations: bool = True,
                      shared_output: torch.Tensor | None = None,
                      shared_weights: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    t, k = topk_ids.shape
    if t <= moe_decode.MAX_TOKENS:
        return moe_decode.decode_experts_fp8(hidden, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids,
                                             block_size, quantize_activations, shared_output, shared_weights)
    if shared_weights is not None:
        sw13, ss13, sw2, ss2 = shared_weights
        gate_up = fp8_block_gemm(hidden, sw13, ss13, block_size, quantize_activations)
        shared_output = fp8_block_gemm(silu_and_mul(gate_up), sw2, ss2, block_size, quantize_activations)
    out = _grouped_experts(hidden, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, block_size,
                           quantize_activations)
    return out if shared_output is None else out + shared_output


def _grouped_experts(hidden, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, block_size,
                     quantize_activations) -> torch.Tensor:
    t, k = topk_ids.shape
    num_experts, two_i, h = w13.shape
    num_slots = t * k
    if num_slots == 0:
        return torch.zeros_like(hidden)
    tiles = _tiles(num_slots, num_experts, hidden.device.type == "cpu")
    sorted_slots, block_expert = align_by_expert(topk_ids, num_experts, tiles[0])
    hidden = hidden.contiguous()
    flat_w = topk_weights.reshape(-1).float().contiguous()
    gate_up = torch.empty(num_slots, two_i, dtype=hidden.dtype, device=hidden.device)
    _stage(hidden, w13, w13_scale, gate_up, flat_w, sorted_slots, block_expert, num_slots, k, True, False,
           block_size, quantize_activations, tiles)
    gate, up = gate_up.chunk(2, dim=-1)
    act = (F.silu(gate) * up).contiguous()
    down = torch.zeros(num_slots, h, dtype=hidden.dtype, device=hidden.device)
    _stage(act, w2, w2_scale, down, flat_w, sorted_slots, block_expert, num_slots, 1, False, True,
           block_size, quantize_activations, tiles)
    return down.view(t, k, h).sum(dim=1)
