"""Triton GEMM for a few tokens (decode at small batch): `x [M, K] @ W^T` with M ≤ `MAX_M`, for
bf16/fp16 weights and for block-scaled FP8 weights (engine/quantization.py's DeepSeek format).
References: `F.linear` and `fp8_ref.fp8_block_gemm_ref`.

At one to a few tokens a linear layer is a matrix-vector product bound by reading the weight once,
and what decides its speed is how many bytes are in flight across the SMs, not tensor cores: a
`tl.dot` tile pads M to 16 and wants wide N tiles, which leaves narrow weights (N = 4096 rows over
132 SMs) with too few programs. Here each program owns `BLOCK_N` rows (a few) over the whole of K,
streams `[BLOCK_N, BLOCK_K]` weight tiles (K contiguous: 16-byte loads) and multiplies them on the
CUDA cores, accumulating `[M, BLOCK_N, BLOCK_K]` partial products in float32 that are summed once at
the end. No split-K, so no atomics, zero fill or cast launch: one launch per GEMM, output written in
the activation dtype.

FP8 weights: `BLOCK_N` divides the scale block's rows, so the rows of a tile share one scale per
128 columns; that scale (and, with dynamic activation quantization, the token's own per-128-column
scale) is folded into the activation row, `O(M·BLOCK_K)` work per step instead of `O(BLOCK_N·BLOCK_K)`.
Activations are quantized exactly as `quantize_activation_ref` does, either inside the kernel (each
program recomputing the few rows it needs) or by one `quantize_activation` launch ahead
(`SkinnyTiles.quant_ahead`, which with `gated` also applies SwiGLU's activation): the same values
either way, and the same as the block GEMM's. Sums are float32 in a
different order than the reference's per-block dot, so results agree to float32 rounding.
Launch shapes depend only on M and the weight (CUDA-graph safe).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.pdl import signal_then_wait
from engine.kernels.fp8_gemm import _quantize_tile, quantize_activation
from engine.quantization import FP8_MAX

MAX_M = 4  # token counts this kernel serves (its registers grow with M)


@triton.jit
def _skinny_step(acc, wv, x, x_ptr, x_scale, w_scale, k0, k, pid, toks, cols, m_ok, k_ok, stride_xsm, stride_sn,
                 SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, FP8_W: tl.constexpr, QUANT_X: tl.constexpr,
                 X_FP8: tl.constexpr, GATED: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K step: the activation columns k0.. (SwiGLU'd, scaled as the mode says) times the weight
    tile `wv` (float32), added to `acc`."""
    GROUPS: tl.constexpr = BLOCK_K // SCALE_COLS
    xv = tl.load(x_ptr + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    if GATED:  # x = [gate | up]: the input is silu(gate) * up, rounded as the unfused ops round
        dt = x.dtype.element_ty
        up = tl.load(x_ptr + k + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        xv = ((xv / (1.0 + tl.exp(-xv))).to(dt).to(tl.float32) * up).to(dt).to(tl.float32)
    if FP8_W:
        g = k0 // SCALE_COLS + tl.arange(0, GROUPS)
        if X_FP8:  # quantized ahead (`quantize_activation`): FP8 values and their scale per group
            xs = tl.load(x_scale + toks[:, None] * stride_xsm + g[None, :],
                         mask=m_ok[:, None] & (g < tl.cdiv(k, SCALE_COLS))[None, :], other=0.0)
            xv = tl.reshape(tl.reshape(xv, [BLOCK_M, GROUPS, SCALE_COLS]) * xs[:, :, None], [BLOCK_M, BLOCK_K])
        elif QUANT_X:  # per token and SCALE_COLS columns, as quantize_activation_ref
            q, s = _quantize_tile(tl.reshape(xv, [BLOCK_M * GROUPS, SCALE_COLS]), FP8_MAX)
            xv = tl.reshape(q * s[:, None], [BLOCK_M, BLOCK_K])
        # the tile's rows share one weight scale per SCALE_COLS columns (BLOCK_N | SCALE_ROWS)
        ws = tl.load(w_scale + (pid * BLOCK_N // SCALE_ROWS) * stride_sn + g,
                     mask=g < tl.cdiv(k, SCALE_COLS), other=0.0)
        ws = tl.reshape(tl.broadcast_to(ws[:, None], [GROUPS, SCALE_COLS]), [BLOCK_K])
        xv = xv * ws[None, :]
    return acc + wv[None, :, :] * xv[:, None, :]


@triton.jit
def _skinny_gemm_kernel(x, x_scale, w, w_scale, c, m, n, k, stride_xm, stride_xsm, stride_wn, stride_sn, stride_cm,
                        stride_xb, stride_wb, stride_cb,
                        SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, FP8_W: tl.constexpr,
                        QUANT_X: tl.constexpr, X_FP8: tl.constexpr, GATED: tl.constexpr, FP8_MAX: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # `skinny_bmm`'s batch (one matrix per batch entry)
    x += batch * stride_xb
    w += batch * stride_wb
    c += batch * stride_cb
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    toks = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    n_ok = rows < n
    m_ok = toks < m
    w_ptr = w + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
    x_ptr = x + toks.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    # The first weight tile needs nothing from the kernels before: it is in flight before the wait for
    # them (engine/kernels/pdl.py), the rest of K after it.
    k_ok = cols < k
    wv = tl.load(w_ptr, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    signal_then_wait(USE_PDL)
    acc = _skinny_step(acc, wv, x, x_ptr, x_scale, w_scale, 0, k, pid, toks, cols, m_ok, k_ok, stride_xsm, stride_sn,
                       SCALE_ROWS, SCALE_COLS, FP8_W, QUANT_X, X_FP8, GATED, FP8_MAX, BLOCK_M, BLOCK_N, BLOCK_K)
    for k0 in range(BLOCK_K, k, BLOCK_K):
        k_ok = cols < k - k0
        wv = tl.load(w_ptr + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc = _skinny_step(acc, wv, x, x_ptr, x_scale, w_scale, k0, k, pid, toks, cols, m_ok, k_ok, stride_xsm,
                           stride_sn, SCALE_ROWS, SCALE_COLS, FP8_W, QUANT_X, X_FP8, GATED, FP8_MAX, BLOCK_M,
                           BLOCK_N, BLOCK_K)
    out = tl.sum(acc, axis=2)
    c_ptr = c + toks.to(tl.int64)[:, None] * stride_cm + rows[None, :]
    tl.store(c_ptr, out.to(c.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class SkinnyTiles:
    """One launch configuration of `_skinny_gemm_kernel`. `quant_ahead` (FP8 weights with dynamic
    activation quantization): one `quantize_activation` launch ahead instead of every program
    quantizing the rows it reads (O(K) work per program; on the H100 the two timed within 2% of each
    other, bench/results/2026-12-07c_h100_fp8_decode.md, so the tuner keeps both)."""
    block_n: int
    block_k: int
    warps: int
    stages: int
    quant_ahead: bool = False


# A row tile's accumulator holds BLOCK_M x BLOCK_N x BLOCK_K float32 values in registers; past this
# many they spill (64 per thread at 8 warps).
MAX_ACC = 16384


def default_tiles(n: int, on_cpu: bool) -> SkinnyTiles:
    """Wide K steps: the bytes in flight over the whole grid are N x BLOCK_K whatever BLOCK_N is, and a
    narrow weight needs megabytes in flight to cover HBM latency."""
    if on_cpu:
        return SkinnyTiles(4, 256, 4, 1)
    return SkinnyTiles(2, 1024, 4, 2)


_TILES = ((1, 2048, 4, 1), (2, 2048, 8, 1), (2, 1024, 4, 2), (4, 1024, 8, 2), (4, 512, 4, 3), (8, 512, 8, 2),
          (8, 1024, 8, 1), (16, 256, 4, 3))
# FP8 weights move half the bytes per element: the same bytes in flight per program need K steps
# twice as long (the accumulator is the limit, `MAX_ACC`).
_FP8_TILES = ((1, 4096, 4, 1), (2, 4096, 8, 1), (2, 2048, 4, 2), (4, 2048, 8, 2), (4, 1024, 4, 3),
              (8, 1024, 8, 2), (8, 2048, 8, 1), (16, 512, 4, 3))


def candidates(fp8: bool = False, quantize_activations: bool = False) -> list[SkinnyTiles]:
    """Configurations the decode tuner times per weight shape (those that fit `MAX_ACC` for its M): for
    FP8 weights also the K-wider ones, and with dynamic activation quantization each both ways
    (quantized in the kernel, or ahead)."""
    out = [SkinnyTiles(*t) for t in _TILES]
    if fp8:
        out += [SkinnyTiles(*t) for t in _FP8_TILES if t not in _TILES]
        if quantize_activations:
            out += [SkinnyTiles(*t, quant_ahead=True) for t in _FP8_TILES]
    return out


def supports(m: int, weight: torch.Tensor, block_size: tuple[int, int] | None, tiles: SkinnyTiles) -> bool:
    """Whether this kernel can run `m` tokens through `weight` with `tiles`."""
    if not 0 < m <= MAX_M or weight.stride(-1) != 1:
        return False
    if triton.next_power_of_2(m) * tiles.block_n * tiles.block_k > MAX_ACC:
        return False
    if block_size is None:
        return True
    bn, bk = block_size
    return bn % tiles.block_n == 0 and tiles.block_k % bk == 0


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
                block_size: tuple[int, int] | None = None, quantize_activations: bool = False,
                tiles: SkinnyTiles | None = None, gated: bool = False) -> torch.Tensor:
    """x `[M, K]` @ weight `[N, K]`^T → `[M, N]` in x's dtype; an FP8 weight comes with its block
    scales (`weight_scale`, `block_size`) and `quantize_activations` as in `fp8_block_gemm_ref`.
    `gated`: x is `[M, 2K]` = `[gate | up]` and the product is `silu(gate) * up` @ weight^T (the SwiGLU
    MLP's down projection with its activation inside: one launch and no activation tensor)."""
    m, k = x.shape[0], weight.shape[1]
    if x.shape[1] != (2 * k if gated else k):
        raise ValueError(f"skinny_gemm: input {tuple(x.shape)} does not match weight {tuple(weight.shape)} "
                         f"(gated={gated})")
    n = weight.shape[0]
    t = tiles or default_tiles(n, x.device.type == "cpu")
    if not supports(m, weight, block_size, t):
        raise ValueError(f"skinny_gemm: M={m} (max {MAX_M}), weight {tuple(weight.shape)} stride {weight.stride()}, "
                         f"block size {block_size} do not fit tiles {t}")
    x = x.contiguous()
    c = torch.empty((m, n), dtype=x.dtype, device=x.device)
    fp8 = weight_scale is not None
    scale = weight_scale if fp8 else x  # unused without FP8
    scale_rows, scale_cols = block_size if fp8 else (1, t.block_k)
    ahead = fp8 and quantize_activations and t.quant_ahead
    a, a_scale = quantize_activation(x, scale_cols, gated) if ahead else (x, scale)  # a_scale unused if not ahead
    _skinny_gemm_kernel[(triton.cdiv(n, t.block_n), 1)](
        a, a_scale, weight, scale, c, m, n, k, a.stride(0), a_scale.stride(0), weight.stride(0), scale.stride(0),
        c.stride(0), 0, 0, 0, SCALE_ROWS=scale_rows, SCALE_COLS=scale_cols, FP8_W=fp8,
        QUANT_X=fp8 and quantize_activations and not ahead, X_FP8=ahead, GATED=gated and not ahead,
        FP8_MAX=FP8_MAX, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        num_warps=t.warps, num_stages=t.stages, **pdl.launch_args(x.device))
    return c


def skinny_bmm(x: torch.Tensor, weight: torch.Tensor, tiles: SkinnyTiles | None = None) -> torch.Tensor:
    """One small matrix product per batch entry, token-major: x `[M, B, K]` and weight `[B, N, K]` →
    `[M, B, N]` with `out[:, b] = x[:, b] @ weight[b]^T` (MLA's per-head value up-projection: the
    attention output `[T, H, R]` through `[H, dv, R]`). Full-precision weights; x and weight may be
    strided views whose last dimension is contiguous. One launch over (row tiles, batch)."""
    m, bsz, k = x.shape
    n = weight.shape[1]
    if weight.shape[0] != bsz or weight.shape[2] != k:
        raise ValueError(f"skinny_bmm: input {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    c = torch.empty((m, bsz, n), dtype=x.dtype, device=x.device)
    if m == 0 or bsz == 0:
        return c
    t = tiles or default_tiles(n, x.device.type == "cpu")
    if not supports(m, weight, None, t) or x.stride(-1) != 1:
        raise ValueError(f"skinny_bmm: M={m} (max {MAX_M}), weight stride {weight.stride()}, input stride "
                         f"{x.stride()} do not fit tiles {t}")
    _skinny_gemm_kernel[(triton.cdiv(n, t.block_n), bsz)](
        x, x, weight, x, c, m, n, k, x.stride(0), 0, weight.stride(1), 0, c.stride(0),
        x.stride(1), weight.stride(0), c.stride(1), SCALE_ROWS=1, SCALE_COLS=t.block_k, FP8_W=False,
        QUANT_X=False, X_FP8=False, GATED=False, FP8_MAX=FP8_MAX, BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.warps, num_stages=t.stages, **pdl.launch_args(x.device))
    return c
