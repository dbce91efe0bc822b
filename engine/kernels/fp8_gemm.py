"""Triton block-scaled FP8 GEMM for linear layers (reference: `fp8_ref.fp8_block_gemm_ref`).

`fp8_block_gemm(x, weight, weight_scale, block_size)` computes `x @ W^T` with tiles whose K step is
one scale block `bk`: each step adds `dot(a, b) * a_scale[m] * b_scale[n]` in float32 (the
DeepSeek-V3 recipe: per-block scales applied to each partial sum, never to FP8 operands), with `x`
quantized per token and `bk` columns. Where that quantization happens is a tile choice
(`GemmTiles.fuse_quant`): once, by `quantize_activation`, ahead of the GEMM (the default on GPU),
or inside the GEMM on each A tile it loads (no second launch, but recomputed for every N tile: on
the H200 from 7 % faster to 32 % slower at M = 1, 1.25-4x slower from M = 64 up;
bench/results/2026-11-29_h200_fp8b.md). The values are the same either way. With
`quantize_activations=False` the weight tile is widened in registers and multiplied in the
activation dtype (weight-only FP8). Launch shapes depend only on M and the weight (CUDA-graph
safe); `split_k` > 1 adds float32 atomics over K slices for narrow, deep weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.pdl import signal_then_wait
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
def _quantize_tile(v, FP8_MAX: tl.constexpr):
    """float32 `[R, G]` → (the FP8 values as float32, scales `[R]`): one scale per row of the tile,
    its absolute maximum mapping to FP8_MAX (`quantize_activation_ref`'s formula)."""
    scale = tl.maximum(tl.max(tl.abs(v), axis=1) / FP8_MAX, 1e-12)
    return _round_to_e4m3(tl.clamp(v / scale[:, None], -FP8_MAX, FP8_MAX)), scale


@triton.jit(do_not_specialize=['m', 'm_out'])  # token counts: one compile for every step size
def _quantize_rows_kernel(x, q, s, m, m_out, k, stride_xm, stride_qm, stride_sm, stride_sg, FP8_MAX: tl.constexpr,
                          GROUP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, GATED: tl.constexpr,
                          USE_PDL: tl.constexpr):
    signal_then_wait(USE_PDL)  # nothing to load ahead (the GEMM after it may start on its weights)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1)
    lane = tl.arange(0, BLOCK)
    cols = g * GROUP + lane
    cols_ok = ((lane < GROUP) & (cols < k))[None, :]
    ok = (rows < m)[:, None] & cols_ok
    rows64 = rows.to(tl.int64)[:, None]
    v = tl.load(x + rows64 * stride_xm + cols[None, :], mask=ok, other=0.0)
    if GATED:  # x = [gate | up]: quantize silu(gate) * up, rounded as `silu_and_mul` rounds it
        up = tl.load(x + rows64 * stride_xm + k + cols[None, :], mask=ok, other=0.0)
        gate = v.to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
        v = (act * up.to(tl.float32)).to(up.dtype)
    y, scale = _quantize_tile(v.to(tl.float32), FP8_MAX)
    # rows m..m_out are padding: zeros with the smallest scale
    tl.store(q + rows64 * stride_qm + cols[None, :], y.to(q.dtype.element_ty), mask=(rows < m_out)[:, None] & cols_ok)
    tl.store(s + rows * stride_sm + g * stride_sg, scale, mask=rows < m_out)


def quantize_activation(x: torch.Tensor, group: int, gated: bool = False, scales_by_column: bool = False,
                        rows_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[M, K]` → (FP8 `[M, K]`, float32 scales `[M, ceil(K/group)]`); see `quantize_activation_ref`.
    `gated`: x is `[M, 2K]` = `[gate | up]` and what is quantized is `silu(gate) * up` (SwiGLU's
    activation and the down projection's quantization in one launch, the values of `silu_and_mul`
    followed by this). One program per `BLOCK_R` rows and group (one per row and group left prefill
    launching 10^5 programs of 128 values each). For cuBLAS's block-scaled GEMM (`scaled_mm_gemm`):
    `scales_by_column` stores the scales column-major (strides `(1, rows)`), and `rows_multiple` pads
    both outputs with zero rows to a multiple of it."""
    m, k = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    groups = triton.cdiv(k, group)
    rows = triton.cdiv(m, rows_multiple) * rows_multiple
    q = torch.empty((rows, k), dtype=FP8_DTYPE, device=x.device)
    if scales_by_column:
        s = torch.empty((groups, rows), dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty((rows, groups), dtype=torch.float32, device=x.device)
    if rows:
        block_r = min(16, triton.next_power_of_2(rows))
        _quantize_rows_kernel[(triton.cdiv(rows, block_r), groups)](
            x, q, s, m, rows, k, x.stride(0), q.stride(0), s.stride(0), s.stride(1), FP8_MAX=FP8_MAX, GROUP=group,
            BLOCK=triton.next_power_of_2(group), BLOCK_R=block_r, GATED=gated,
            **pdl.launch_args(x.device, m))
    return q, s


# How the kernel gets its A operand (`A_MODE`).
A_FP8 = 0  # FP8 activations and scales quantized beforehand (`quantize_activation`, one more launch)
A_QUANTIZE = 1  # bf16 activations, quantized per (row, K block) inside the GEMM: no extra launch
A_WEIGHT_ONLY = 2  # bf16 activations kept; the FP8 weight tile is widened in registers (W8A16)


@triton.jit
def _gemm_step(acc, x, w, ws, as_ptr, kb, m_ok, A_MODE: tl.constexpr, FP8_MAX: tl.constexpr):
    """One K block: `dot(a, b)` with the block's scales applied to the partial product, added to `acc`."""
    if A_MODE == 0:
        xs = tl.load(as_ptr + kb, mask=m_ok, other=0.0)
        acc += tl.dot(x, w) * xs[:, None] * ws[None, :]
    elif A_MODE == 1:
        xq, xs = _quantize_tile(x.to(tl.float32), FP8_MAX)
        acc += tl.dot(xq.to(w.dtype), w) * xs[:, None] * ws[None, :]
    else:  # e4m3 values are exact in bf16/fp32: scale the partial product, not the operand
        acc += tl.dot(x, w.to(x.dtype)) * ws[None, :]
    return acc


@triton.jit(do_not_specialize=['m'])  # token counts: one compile for every step size
def _fp8_gemm_kernel(a, a_scale, b, b_scale, c, m, n, k, stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                     partial, arrived, SCALE_ROWS: tl.constexpr, A_MODE: tl.constexpr, FP8_MAX: tl.constexpr,
                     SPLIT_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     FIXUP: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
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
    a_ptr = a + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] + split * BLOCK_K
    b_ptr = b + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] + split * BLOCK_K
    bs_ptr = b_scale + (offs_n // SCALE_ROWS) * stride_bsn
    as_ptr = a_scale + offs_m * stride_asm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    blocks = tl.cdiv(k, BLOCK_K)
    # No tile is loaded ahead of the wait here: peeling one off the software-pipelined loop exposed the
    # next tile's latency (H100, 2026-12-07d); nor did asking L2 for the first weight bytes of each
    # row before it help (0-10 % slower, 2026-12-07o).
    signal_then_wait(USE_PDL)
    for kb in range(split, blocks, SPLIT_K):  # one K step = one scale block
        k_ok = offs_k < k - kb * BLOCK_K
        x = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        ws = tl.load(bs_ptr + kb, mask=n_ok, other=0.0)
        acc = _gemm_step(acc, x, w, ws, as_ptr, kb, m_ok, A_MODE, FP8_MAX)
        a_ptr += BLOCK_K * SPLIT_K
        b_ptr += BLOCK_K * SPLIT_K
    c_ptr = c + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptr, acc.to(c.dtype.element_ty), mask=ok)
    elif FIXUP:  # K slices add into a zeroed float32 workspace; the tile's last slice to arrive writes c
        w_ptr = partial + offs_m[:, None].to(tl.int64) * n + offs_n[None, :]
        tl.atomic_add(w_ptr, acc, mask=ok)
        tl.debug_barrier()  # every thread's adds before the count (the count's release orders them)
        if tl.atomic_add(arrived + pid, 1) == SPLIT_K - 1:  # acq_rel: the other slices' adds are visible
            # read at L2 and leave zeros (as int32 bits: the interpreter exchanges no floats)
            bits = tl.atomic_xchg(w_ptr.to(tl.pointer_type(tl.int32)), tl.zeros(acc.shape, tl.int32), mask=ok)
            total = bits.to(tl.float32, bitcast=True)
            tl.store(c_ptr, total.to(c.dtype.element_ty), mask=ok)
            tl.store(arrived + pid, 0)  # zero for the next launch (ordered after this one's end)
    else:  # c is float32, zeroed by the caller
        tl.atomic_add(c_ptr, acc, mask=ok)


@dataclass(frozen=True)
class GemmTiles:
    """One launch configuration of `_fp8_gemm_kernel`."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    fuse_quant: bool = True  # A_QUANTIZE rather than A_FP8 (when activations are quantized)
    split_k: int = 1  # > 1: float32 atomics into a zeroed buffer, then a cast (two more launches)
    group_m: int = 8


def gemm_tiles(m: int, n: int, k: int, on_cpu: bool) -> GemmTiles:
    """Default tiles by token count (launch shapes depend only on M and the weight: CUDA-graph safe),
    from the H200 sweep (bench/fp8_gemm_sweep.py, bench/results/2026-11-29_h200_fp8b.md): quantizing
    activations inside the GEMM recomputes them for every N tile and measured 2-4x slower than one
    `quantize_activation` launch ahead from M = 64 up (-7 % to +32 % at M = 1); decode sizes want
    narrow N tiles (every SM busy streaming the weight), prefill 128x128 tiles with 8 warps for wide
    weights and 64x128 with 4 for narrow ones. `engine/kernels/decode_gemm.py` times the decode
    candidates on the device instead."""
    if on_cpu:
        return GemmTiles(16, 32, 4, 1)
    wide = n >= 16384
    if m <= 16:
        return GemmTiles(16, 64, 4, 4, fuse_quant=False) if wide else GemmTiles(16, 32, 4, 6, fuse_quant=False)
    if m <= 64:
        return GemmTiles(32 if m <= 32 else 64, 64 if wide else 32, 4, 4, fuse_quant=False)
    return GemmTiles(128, 128, 8, 4, fuse_quant=False) if wide else GemmTiles(64, 128, 4, 4, fuse_quant=False)


def gated_supported(tiles: GemmTiles, quantize_activations: bool) -> bool:
    """Whether `fp8_block_gemm(..., gated=True)` can run with these tiles: only where activations are
    quantized ahead of the GEMM (the quantization launch applies SwiGLU's activation too)."""
    return quantize_activations and not tiles.fuse_quant


def fp8_block_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   block_size: tuple[int, int], quantize_activations: bool = True,
                   tiles: GemmTiles | None = None, gated: bool = False) -> torch.Tensor:
    """x `[M, K]` @ dequant(weight `[N, K]`)^T → `[M, N]` in x's dtype; see `fp8_block_gemm_ref`.
    `gated` (where `gated_supported`): x is `[M, 2K]` = `[gate | up]` and the GEMM's input is
    `silu(gate) * up`, made and quantized by one launch."""
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    bn, bk = block_size
    if x.shape[1] != (2 * k if gated else k):
        raise ValueError(f"fp8_block_gemm: input {tuple(x.shape)} does not match weight {tuple(weight.shape)} "
                         f"(gated={gated})")
    if m == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    x = x.contiguous()
    t = tiles or gemm_tiles(m, n, k, x.device.type == "cpu")
    if gated and not gated_supported(t, quantize_activations):
        raise ValueError(f"fp8_block_gemm: gated input needs activations quantized ahead, not tiles {t} "
                         f"(quantize_activations={quantize_activations})")
    if not quantize_activations:
        mode, a, a_scale = A_WEIGHT_ONLY, x, weight_scale  # a_scale unused
    elif t.fuse_quant:
        mode, a, a_scale = A_QUANTIZE, x, weight_scale  # a_scale unused
    else:
        mode, (a, a_scale) = A_FP8, quantize_activation(x, bk, gated)
    grid = (triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n), t.split_k)
    space = split_k_workspace(x.device, m * n, grid[0]) if t.split_k > 1 else None
    if t.split_k > 1 and space is None:  # float32 atomics into a zeroed c, then a cast: two more launches
        c = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        c = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial, arrived = space or (c, c)  # unused without the workspace
    _fp8_gemm_kernel[grid](a, a_scale, weight, weight_scale, c, m, n, k, a.stride(0), a_scale.stride(0),
                           weight.stride(0), weight_scale.stride(0), c.stride(0), partial, arrived, SCALE_ROWS=bn,
                           A_MODE=mode, FP8_MAX=FP8_MAX, SPLIT_K=t.split_k, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                           BLOCK_K=bk, GROUP_M=t.group_m, FIXUP=space is not None, num_warps=t.warps,
                           num_stages=t.stages, **pdl.launch_args(x.device, m))
    return c.to(x.dtype) if c.dtype != x.dtype else c


# Split-K's float32 workspace and per-tile arrival counts, per device: zero between launches (each
# launch's last K slice of a tile zeroes what it used), so a split-K GEMM needs no zero fill before it
# nor cast after it, and its PDL chain is unbroken. One per device suffices: a device's GEMMs run one
# after another on the engine's one compute stream (a PDL launch touches it only after its wait).
# Every allocation stays alive, since CUDA graphs captured with it keep its address.
_split_k_space: dict = {}
_split_k_retired: list = []


def split_k_workspace(device: torch.device, elems: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(float32 `[≥ elems]` zeros, int32 `[≥ tiles]` zeros) for a split-K launch on `device`; None while a
    CUDA graph is being captured and the current one is too small (nothing can be zeroed then: the
    caller falls back to a zero fill and a cast)."""
    have = _split_k_space.get((device.type, device.index))
    if have is not None and have[0].numel() >= elems and have[1].numel() >= tiles:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if have is not None:
        _split_k_retired.append(have)
        elems, tiles = max(elems, 2 * have[0].numel()), max(tiles, 2 * have[1].numel())
    have = (torch.zeros(max(elems, 1 << 16), dtype=torch.float32, device=device),
            torch.zeros(max(tiles, 1 << 10), dtype=torch.int32, device=device))
    _split_k_space[(device.type, device.index)] = have
    return have


# cuBLASLt's block-scaled FP8 GEMM (CUDA >= 12.9, sm90; `torch._scaled_mm` with DeepSeek's 1x128
# activation and 128x128 weight scales). The activations' scales go column-major with one column per K
# block, and their row count padded to SCALED_MM_ROWS (cuBLASLt's alignment of that column; vLLM pads the
# same); the weight and its scales are used as loaded ([N, K] row-major is B = W^T column-major).
SCALED_MM_ROWS = 4
SCALED_MM_BLOCK = (128, 128)


def scaled_mm_supported(weight: torch.Tensor, weight_scale: torch.Tensor, block_size,
                        quantize_activations: bool) -> bool:
    """Whether `scaled_mm_gemm` takes this weight: e4m3 with 128x128 blocks that tile it exactly,
    activations quantized (W8A8), and a K-block count that is a multiple of 4 (torch aligns the weight
    scales' rows to 4 blocks from 2.10 on and not before, so other counts are left to the Triton GEMM)."""
    if not quantize_activations or tuple(block_size or ()) != SCALED_MM_BLOCK or not hasattr(torch, "_scaled_mm"):
        return False
    n, k = weight.shape
    return (weight.dtype == FP8_DTYPE and weight_scale.dtype == torch.float32 and n % 128 == 0
            and k % (4 * 128) == 0 and tuple(weight_scale.shape) == (n // 128, k // 128)
            and weight.is_contiguous() and weight_scale.is_contiguous())


def scaled_mm_operands(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, gated: bool = False):
    """`torch._scaled_mm`'s arguments for x `[M, K]` (or SwiGLU's `[M, 2K]` where `gated`) @ dequant(W)^T:
    (A `[M', K]` FP8, B `[K, N]` column-major, A's scales `[M', K/128]` column-major, B's `[K/128, N/128]`
    column-major); M' is M rounded up to SCALED_MM_ROWS."""
    a, a_scale = quantize_activation(x, SCALED_MM_BLOCK[1], gated, scales_by_column=True,
                                     rows_multiple=SCALED_MM_ROWS)
    return a, weight.t(), a_scale, weight_scale.t()


def scaled_mm_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   gated: bool = False) -> torch.Tensor:
    """`fp8_block_gemm(x, weight, weight_scale, (128, 128))` through cuBLASLt (where
    `scaled_mm_supported`): one quantization launch, then one cuBLAS GEMM. Same quantized operands and
    scales as the Triton GEMM; the sum's order (and so its last bits) is cuBLAS's."""
    m = x.shape[0]
    if m == 0:
        return torch.empty((0, weight.shape[0]), dtype=x.dtype, device=x.device)
    a, b, a_scale, b_scale = scaled_mm_operands(x.contiguous(), weight, weight_scale, gated)
    out = torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale, out_dtype=x.dtype)
    return out[:m] if out.shape[0] != m else out
