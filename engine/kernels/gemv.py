"""Triton GEMV for decode-sized batches: `y = x @ w.T` with `x [M, K]`, M <= 4, `w [N, K]` bf16/fp16.

At batch 1 a decoder's projections are pure weight streams, and cuBLAS's choices for the smaller
ones (Qwen3-8B's q/k/v and o_proj, the down projection's split-K plus its reduce kernel) run at
~65-80% of the HBM copy rate. Here each program streams BLOCK_N whole weight rows once, in K
tiles, and keeps the M dot products in float32 registers: one kernel, no split-K reduce.
`choose` times a few tile configs against cuBLAS once per shape (L2 flushed between runs, outside
any graph capture) and the caller keeps whichever is fastest. Reference: `torch.nn.functional.linear`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_M = 4

# (BLOCK_N, BLOCK_K, num_warps) tried per shape by `choose`; the first is the default.
CONFIGS = ((8, 512, 4), (16, 256, 4), (4, 1024, 8))


@triton.jit
def _gemv_kernel(x, w, y, M, N, K, stride_xm, stride_wn, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rm = tl.arange(0, BLOCK_M)
    mmask = rm < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_rows = w + rn.to(tl.int64)[:, None] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        wt = tl.load(w_rows + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        xt = tl.load(x + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(xt[:, None, :] * wt[None, :, :], axis=2)
    tl.store(y + rm[:, None] * stride_ym + rn[None, :], acc.to(y.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int] = CONFIGS[0]) -> torch.Tensor:
    """`x [M, K]` (M <= MAX_M, unit stride along K) @ `w [N, K]`.T → `[M, N]` in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    if m > MAX_M or w.shape[1] != k or x.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError(f"gemv takes x [M<={MAX_M}, K] and w [N, K] with unit inner stride; got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                                             BLOCK_M=triton.next_power_of_2(max(m, 1)), BLOCK_N=block_n,
                                             BLOCK_K=block_k, num_warps=warps)
    return y


_CHOSEN: dict[tuple, tuple | None] = {}


def choose(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int] | None:
    """The fastest `gemv` config for this (N, K, M bucket, dtype, device), or None where cuBLAS is
    faster: measured on the first call, L2 flushed between runs (`do_bench`); during graph capture,
    where nothing may be timed, None until a measurement exists."""
    key = (w.shape[0], w.shape[1], triton.next_power_of_2(max(x.shape[0], 1)), w.dtype, x.device)
    if key in _CHOSEN:
        return _CHOSEN[key]
    if torch.cuda.is_current_stream_capturing():
        return None
    from triton.testing import do_bench

    best, best_ms = None, 0.97 * do_bench(lambda: torch.nn.functional.linear(x, w), warmup=5, rep=25)
    for config in CONFIGS:
        ms = do_bench(lambda: gemv(x, w, config), warmup=5, rep=25)
        if ms < best_ms:
            best, best_ms = config, ms
    _CHOSEN[key] = best
    return best


def choices() -> dict[str, str]:
    """What was chosen per shape, for logs and benches: 'NxK mM dtype' -> config or 'cublas'."""
    return {f"{n}x{k} m{m} {str(dt).removeprefix('torch.')}": (str(c) if c else "cublas")
            for (n, k, m, dt, _), c in _CHOSEN.items()}
