"""Triton RMSNorm (plain, and fused with the residual add) and SiLU-and-mul, with the contracts
of `norm_act_ref.py`. One program per row; the whole row sits in registers (hidden sizes up to
a few thousand), so each kernel reads its inputs once and writes its outputs once, where the
torch form runs 6-8 elementwise kernels and a reduction with float32 intermediates in memory.
Launch shapes depend only on the number of rows (CUDA-graph safe)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.pdl import signal_then_wait


@triton.jit
def _rms_norm_kernel(x, res, w, out, res_out, stride_x, stride_r, stride_o, stride_ro, d, eps,
                     HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    wv = tl.load(w + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: before the wait (pdl.py)
    signal_then_wait(USE_PDL)
    v = tl.load(x + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        # The sum is rounded to the activation dtype, as `x + residual` in torch would be.
        v = (v.to(tl.float32) + tl.load(res + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        v = v.to(res_out.dtype.element_ty)
        tl.store(res_out + row * stride_ro + cols, v, mask=mask)
    vf = v.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(vf * vf, axis=0) / d + eps)
    y = (vf * inv).to(v.dtype).to(tl.float32)
    tl.store(out + row * stride_o + cols, (y * wv).to(out.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch_norm(x, residual, weight, eps):
    d = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is None:
        r2 = res_out = x2
    else:
        r2 = _rows(residual)
        res_out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0), d, eps,
            HAS_RES=residual is not None, BLOCK_D=triton.next_power_of_2(d), num_warps=4 if d <= 4096 else 8,
            **pdl.launch_args(x.device, x2.shape[0]))
    return out.view(*x.shape[:-1], d), res_out.view(*x.shape[:-1], d)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch_norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_norm(x, residual, weight, eps)


@triton.jit
def _silu_and_mul_kernel(x, out, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + row * stride_x + n + cols, mask=mask, other=0.0)
    # silu rounded to the activation dtype first, as torch's `F.silu(gate) * up` does.
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(out + row * stride_o + cols, (act * up.to(tl.float32)).to(out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, x2.stride(0), out.stride(0), n,
                                                                   BLOCK=block)
    return out.view(*x.shape[:-1], n)
