"""Compares the Triton FP8 kernels (activation quantization, block-scaled GEMM, fused MoE) with
their torch references (interpreter on CPU, native on CUDA).
Usage: python -m tests.engine.kernels.check_fp8 [device] [small|real] [gemm (skip the MoE cases)]"""
from __future__ import annotations

import dataclasses
import sys

import torch

from engine.kernels.fp8_gemm import (GemmTiles, fp8_block_gemm, gemm_tiles, quantize_activation, scaled_mm_gemm,
                                     scaled_mm_operands, scaled_mm_supported)
from engine.kernels.fp8_ref import fp8_block_gemm_ref, fused_experts_fp8_ref, quantize_activation_ref
from engine.kernels.decode_gemm import fp8_candidates as candidates
from engine.kernels.fused_moe_fp8 import fused_experts_fp8
from engine.kernels.norm_act_ref import silu_and_mul as silu_and_mul_ref
from engine.quantization import quantize_blocks


def _rel(got, ref) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)).item()


def check_activation(m, k, group, dtype, device) -> float:
    torch.manual_seed(m)
    x = (torch.randn(m, k, device=device) * 3).to(dtype)
    q, s = quantize_activation(x, group)
    qr, sr = quantize_activation_ref(x, group)
    return max(_rel(s, sr), _rel(q.float() * s.repeat_interleave(group, 1)[:, :k],
                                 qr.float() * sr.repeat_interleave(group, 1)[:, :k]))


def check_gated_activation(m, k, group, dtype, device) -> float:
    """`[gate | up]` → silu(gate) * up quantized in one launch, against `silu_and_mul` then the reference
    quantization: the same FP8 values and scales."""
    torch.manual_seed(m + 1)
    x = (torch.randn(m, 2 * k, device=device) * 3).to(dtype)
    q, s = quantize_activation(x, group, gated=True)
    qr, sr = quantize_activation_ref(silu_and_mul_ref(x), group)
    return max(_rel(s, sr), _rel(q.float() * s.repeat_interleave(group, 1)[:, :k],
                                 qr.float() * sr.repeat_interleave(group, 1)[:, :k]))


def check_gemm(m, n, k, block, dtype, device, quantize_activations, tiles=None, gated: bool = False) -> float:
    """`gated`: the input is `[gate | up]` and the reference runs `silu_and_mul_ref` first."""
    torch.manual_seed(n + k)
    x = torch.randn(m, 2 * k if gated else k, device=device).to(dtype)
    w8, ws = quantize_blocks(torch.randn(n, k, device=device) * k ** -0.5, block)
    return _rel(fp8_block_gemm(x, w8, ws, block, quantize_activations, tiles, gated),
                fp8_block_gemm_ref(silu_and_mul_ref(x) if gated else x, w8, ws, block, quantize_activations))


def check_split_k_reuse(shapes, block, dtype, device) -> float:
    """Split-K GEMMs back to back (several shapes, one twice): each adds into the shared workspace and
    its tiles' last K slices write the output and zero what they used, so each is right and the
    workspace and arrival counts are all zero afterwards (a nonzero entry counts as an error of 1)."""
    from engine.kernels import fp8_gemm
    err = 0.0
    for m, n, k in shapes + shapes[:1]:
        t = dataclasses.replace(gemm_tiles(m, n, k, device == "cpu"), split_k=4, fuse_quant=False)
        err = max(err, check_gemm(m, n, k, block, dtype, device, True, t))
    space, counts = next(v for (kind, _), v in fp8_gemm._split_k_space.items() if kind == torch.device(device).type)
    return max(err, float(space.count_nonzero().item() + counts.count_nonzero().item()))


def emulate_scaled_mm(a, b, a_scale, b_scale) -> torch.Tensor:
    """`torch._scaled_mm`'s block-scaled product as documented (A's scales per row and 128 columns, B's
    per 128x128 block, each multiplying its block), in float32, from the operands' own strides."""
    sa = a_scale.repeat_interleave(128, 1)[:, :a.shape[1]]
    sb = b_scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:b.shape[0], :b.shape[1]]
    return (a.float() * sa) @ (b.float() * sb)


def check_scaled_mm(m, n, k, dtype, device, gated: bool = False) -> float:
    """cuBLAS's block-scaled path against the reference. On CPU the operands (FP8 A padded to 4 rows,
    column-major scales, W^T views) go through `emulate_scaled_mm`, which checks their layout and values;
    on CUDA `scaled_mm_gemm` runs cuBLASLt (inf if this torch/cuBLAS refuses it: the tuner then never
    offers it)."""
    torch.manual_seed(m + n)
    x = torch.randn(m, 2 * k if gated else k, device=device).to(dtype)
    w8, ws = quantize_blocks(torch.randn(n, k, device=device) * k ** -0.5, (128, 128))
    assert scaled_mm_supported(w8, ws, (128, 128), True)
    ref = fp8_block_gemm_ref(silu_and_mul_ref(x) if gated else x, w8, ws, (128, 128), True)
    if device == "cpu":
        a, b, sa, sb = scaled_mm_operands(x, w8, ws, gated)
        assert a.shape[0] % 4 == 0 and sa.stride() == (1, a.shape[0]) and b.stride() == (1, k), (a.shape, sa.stride())
        assert a[m:].float().abs().max().item() == 0 if a.shape[0] > m else True
        return _rel(emulate_scaled_mm(a, b, sa, sb)[:m], ref)
    try:
        got = scaled_mm_gemm(x, w8, ws, gated)
    except RuntimeError as e:
        print(f"    scaled_mm refused: {str(e).splitlines()[0][:200]}")
        return float("inf")
    return _rel(got, ref)


def check_moe(t, e, h, i, k, block, dtype, device, quantize_activations) -> float:
    torch.manual_seed(t)
    x = torch.randn(t, h, device=device).to(dtype)
    w13, s13 = quantize_blocks(torch.randn(e, 2 * i, h, device=device) * h ** -0.5, block)
    w2, s2 = quantize_blocks(torch.randn(e, h, i, device=device) * i ** -0.5, block)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(device, torch.int32)
    ids[::3, 0] = -1  # an expert on another rank
    wts = torch.rand(t, k, device=device)
    args = (x, w13, s13, w2, s2, wts, ids, block, quantize_activations)
    return _rel(fused_experts_fp8(*args), fused_experts_fp8_ref(*args))


def _variant(t: GemmTiles, name: str) -> GemmTiles:
    """The non-default paths: FP8 activations quantized ahead by their own launch (CPU default:
    inside the GEMM; GPU default: ahead, so there the other), or split K with float32 atomics."""
    if name == "prequantized":
        return dataclasses.replace(t, fuse_quant=not t.fuse_quant)
    return dataclasses.replace(t, split_k=2)


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    size = sys.argv[2] if len(sys.argv) > 2 else "small"
    gemm_only = len(sys.argv) > 3 and sys.argv[3] == "gemm"
    if size == "small":
        dtype, tol, block = torch.float32, 1e-4, (16, 32)
        acts = [(5, 72, 32)]
        gemms = [(m, 40, 72) for m in (1, 5, 33)]
        moes = [(t, 8, 64, 32, 2) for t in (1, 5, 33)]
    else:
        dtype, tol, block = torch.bfloat16, 2e-2, (128, 128)
        acts = [(64, 7168, 128)]
        gemms = [(m, n, k) for m in (1, 16, 256) for n, k in ((6144, 4096), (4096, 12288), (24576, 1536))]
        moes = [(t, 32, 7168, 2048, 8) for t in (1, 64, 512)]
    bad = 0
    cases = [(f"act {c}", lambda c=c: check_activation(*c, dtype, device)) for c in acts]
    cases += [(f"gated act {c}", lambda c=c: check_gated_activation(*c, dtype, device)) for c in acts]
    ahead = dataclasses.replace(gemm_tiles(*gemms[-1], device == "cpu"), fuse_quant=False)
    cases.append((f"gemm {gemms[-1]} gated", lambda c=gemms[-1]: check_gemm(*c, block, dtype, device, True, ahead,
                                                                           gated=True)))
    for qa in (True, False):
        cases += [(f"gemm {c} qa={qa}", lambda c=c, qa=qa: check_gemm(*c, block, dtype, device, qa)) for c in gemms]
        for variant in ("prequantized", "split_k=2"):  # the non-default tile choices, at one size each
            cases.append((f"gemm {gemms[-1]} qa={qa} {variant}", lambda c=gemms[-1], qa=qa, v=variant: check_gemm(
                *c, block, dtype, device, qa, _variant(gemm_tiles(c[0], c[1], c[2], device == "cpu"), v))))
        cases += [] if gemm_only else [(f"moe {c} qa={qa}", lambda c=c, qa=qa: check_moe(*c, block, dtype, device, qa))
                                       for c in moes]
    cases.append(("gemm split-K workspace reuse", lambda: check_split_k_reuse(gemms, block, dtype, device)))
    sm_shapes = [(5, 256, 512), (8, 128, 1024)] if size == "small" else [
        (m, n, k) for m in (1, 3, 4, 64, 2047) for n, k in ((6144, 4096), (4096, 12288))]
    sm_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cases += [(f"scaled_mm {c}", lambda c=c: check_scaled_mm(*c, sm_dtype, device)) for c in sm_shapes]
    cases.append((f"scaled_mm {sm_shapes[0]} gated", lambda: check_scaled_mm(*sm_shapes[0], sm_dtype, device, True)))
    n, k = gemms[0][1:]
    for m in (1, 33):  # every tiling the decode tuner may pick (engine/kernels/decode_gemm.py)
        cases.append((f"gemm ({m}, {n}, {k}) tuner candidates", lambda m=m: max(
            check_gemm(m, n, k, block, dtype, device, True, t) for t in candidates(m, True))))
    for label, fn in cases:
        err = fn()
        ok = err < tol
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {label}: rel err {err:.2e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
