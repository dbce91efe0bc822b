"""Triton block-scaled FP8 GEMM for linear layers (reference: `fp8_ref.fp8_block_gemm_ref`).

`quantize_activation(x, group)` quantizes activations per token and per `group` columns (one
program per row and group); `fp8_block_gemm(x, weight, weight_scale, block_size)` quantizes `x`
with the weight's column block `bk` as the group, then computes `x @ W^T` with tiles whose K step
is one scale group: each K step adds `dot(a, b) * a_scale[m] * b_scale[n]` in float32 (the
DeepSeek-V3 recipe: per-block scales applied to each partial sum, never to FP8 operands). With
`quantize_activations=False` the weight tile is dequantized in registers and multiplied in the
activation dtype (weight-only FP8). Launch shapes depend only on M (CUDA-graph safe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.quantization import FP8_DTYPE, FP8_MAX


@triton.jit
def _round_to_e4m3(v):
    """Round float32 to e4m3's 3 mantissa bits (nearest, ties to even) so the FP8 cast is exact: the
    same values as torch's cast everywhere, including Triton's interpreter, whose float-to-FP8
    conversion mis-rounds values next to a power of two. (Below e4m3's normal range, 2^-6 of a
    scale's maximum, the interpreter still flushes to zero.)"""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quantize_rows_kernel(x, q, s, k, stride_xm, stride_qm, stride_sm, FP8_MAX: tl.constexpr,
                          GROUP: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    lane = tl.arange(0, BLOCK)
    cols = g * GROUP + lane
    ok = (lane < GROUP) & (cols < k)
    v = tl.load(x + m * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(v), axis=0) / FP8_MAX, 1e-12)
    y = _round_to_e4m3(tl.clamp(v / scale, -FP8_MAX, FP8_MAX))
    tl.store(q + m * stride_qm + cols, y.to(q.dtype.element_ty), mask=ok)
    tl.store(s + m * stride_sm + g, scale)


def quantize_activation(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[M, K]` → (FP8 `[M, K]`, float32 scales `[M, ceil(K/group)]`); see `quantize_activation_ref`."""
    m, k = x.shape
    groups = triton.cdiv(k, group)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m:
        _quantize_rows_kernel[(m, groups)](x, q, s, k, x.stride(0), q.stride(0), s.stride(0), FP8_MAX=FP8_MAX,
                                           GROUP=group, BLOCK=triton.next_power_of_2(group))
    return q, s


@triton.jit
def _fp8_gemm_kernel(a, a_scale, b, b_scale, c, m, n, k, stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                     SCALE_ROWS: tl.constexpr, A_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(m, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    per_group = GROUP_M * tiles_n  # consecutive programs share A rows (L2 reuse)
    first_m = (pid // per_group) * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < m
    n_ok = offs_n < n
    a_ptr = a + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptr = b + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    bs_ptr = b_scale + (offs_n // SCALE_ROWS) * stride_bsn
    as_ptr = a_scale + offs_m * stride_asm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(k, BLOCK_K)):
        k_ok = offs_k < k - kb * BLOCK_K
        x = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        ws = tl.load(bs_ptr + kb, mask=n_ok, other=0.0)
        if A_FP8:
            xs = tl.load(as_ptr + kb, mask=m_ok, other=0.0)
            acc += tl.dot(x, w) * xs[:, None] * ws[None, :]
        else:
            acc += tl.dot(x, (w.to(tl.float32) * ws[None, :]).to(x.dtype))
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    c_ptr = c + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptr, acc.to(c.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _tiles(m: int, on_cpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by token count."""
    if on_cpu:
        return 16, 32, 4, 1
    if m <= 16:
        return 16, 64, 4, 4
    if m <= 64:
        return 64, 64, 4, 4
    return 128, 128, 8, 3


def fp8_block_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   block_size: tuple[int, int], quantize_activations: bool = True) -> torch.Tensor:
    """x `[M, K]` @ dequant(weight `[N, K]`)^T → `[M, N]` in x's dtype; see `fp8_block_gemm_ref`."""
    m, k = x.shape
    n = weight.shape[0]
    bn, bk = block_size
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    x = x.contiguous()
    if quantize_activations:
        a, a_scale = quantize_activation(x, bk)
    else:
        a, a_scale = x, weight_scale  # a_scale unused
    block_m, block_n, warps, stages = _tiles(m, x.device.type == "cpu")
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _fp8_gemm_kernel[grid](a, a_scale, weight, weight_scale, out, m, n, k, a.stride(0), a_scale.stride(0),
                           weight.stride(0), weight_scale.stride(0), out.stride(0), SCALE_ROWS=bn,
                           A_FP8=quantize_activations, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk, GROUP_M=8,
                           num_warps=warps, num_stages=stages)
    return out
