"""Compares the skinny Triton GEMM (engine/kernels/skinny_gemm.py) with its references — `F.linear`
for full-precision weights, `fp8_block_gemm_ref` for block-scaled FP8 weights with and without dynamic
activation quantization — for every tiling the decode tuner may pick (interpreter on CPU, native on CUDA).
and with the SwiGLU input `[gate | up]` (`gated`).
Also `skinny_bmm` (MLA's per-head value up-projection) against torch.bmm.
Usage: python -m tests.engine.kernels.check_skinny_gemm [device] [small|batch1|real]"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from engine.kernels import skinny_gemm as sk
from engine.kernels.fp8_ref import fp8_block_gemm_ref
from engine.kernels.norm_act_ref import silu_and_mul as silu_and_mul_ref
from engine.quantization import quantize_blocks


def _rel(got, ref) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)).item()


def check(m, n, k, block, dtype, device, fp8: bool, quantize_activations: bool, tiles, gated: bool = False) -> float:
    """`gated`: the input is `[gate | up]` and the reference runs `silu_and_mul_ref` first."""
    torch.manual_seed(m * n + k)
    x = torch.randn(m, 2 * k if gated else k, device=device).to(dtype)
    x_in = silu_and_mul_ref(x) if gated else x
    w = torch.randn(n, k, device=device) * k ** -0.5
    if not fp8:
        w = w.to(dtype)
        return _rel(sk.skinny_gemm(x, w, tiles=tiles, gated=gated), F.linear(x_in.float(), w.float()))
    w8, ws = quantize_blocks(w, block)
    return _rel(sk.skinny_gemm(x, w8, ws, block, quantize_activations, tiles, gated),
                fp8_block_gemm_ref(x_in, w8, ws, block, quantize_activations))


def check_bmm(m, heads, rank, dn, dv, dtype, device, tiles) -> float:
    """`skinny_bmm` (MLA's value up-projection: `[T, H, R]` through each head's value rows of `kv_b_proj`,
    read in place as a strided view) against torch.bmm over the transposed copy the engine keeps."""
    torch.manual_seed(m + heads)
    w_kvb = (torch.randn(heads, dn + dv, rank, device=device) * rank ** -0.5).to(dtype)
    w_vu = w_kvb[:, dn:]
    x = torch.randn(m, heads, rank, device=device).to(dtype)
    ref = torch.bmm(x.float().transpose(0, 1), w_vu.float().transpose(1, 2)).transpose(0, 1)
    return _rel(sk.skinny_bmm(x, w_vu, tiles), ref)


def tilings(device: str, *args) -> list:
    """The tuner's candidates; on CPU one per (block_n, block_k, quant_ahead): the interpreter ignores
    warps and stages, so tilings differing only there run the same program."""
    cands = sk.candidates(*args)
    if device != "cpu":
        return cands
    return list({(t.block_n, t.block_k, t.quant_ahead): t for t in cands}.values())


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    size = sys.argv[2] if len(sys.argv) > 2 else "small"
    if size == "small":  # N and K not multiples of any tile; several scale blocks both ways; M = 3 pads to 4
        dtype, tol, block, shapes, ms = torch.float32, 1e-5, (16, 32), [(40, 300)], (1, 3)
    elif size == "batch1":  # the engine's batch-1 shapes only (Qwen3-8B qkv and down): a short device call
        dtype, tol, block, ms = torch.bfloat16, 1e-2, (128, 128), (1,)
        shapes = [(6144, 4096), (4096, 12288)]
    else:
        dtype, tol, block, ms = torch.bfloat16, 1e-2, (128, 128), (1, 2, 4)
        shapes = [(6144, 4096), (4096, 12288), (576, 7168), (151936, 4096)]
    bmms = [(3, 96, 16, 40)] if size == "small" else [(16, 512, 128, 128), (128, 512, 128, 128)]
    bad = 0
    for heads, rank, dn, dv in bmms:  # every tiling, at every M
        errs = [(check_bmm(m, heads, rank, dn, dv, dtype, device, t), m, t) for m in ms for t in tilings(device)
                if sk.supports(m, torch.empty(1, 1), None, t)]
        err, m, worst = max(errs, key=lambda e: e[0])
        bad += err >= tol
        print(f"{'ok ' if err < tol else 'BAD'} bmm heads={heads} rank={rank} dv={dv}: {len(errs)} cases, "
              f"max rel err {err:.2e} (m={m}, {worst})")
    for n, k in shapes:
        for fp8, qa in ((False, False), (True, True), (True, False)):
            for m in ms:
                errs = [(check(m, n, k, block, dtype, device, fp8, qa, t), t) for t in tilings(device, fp8, qa)
                        if sk.supports(m, torch.empty(1, 1), block if fp8 else None, t)]
                err, worst = max(errs, key=lambda e: e[0])
                ok = err < tol
                bad += not ok
                print(f"{'ok ' if ok else 'BAD'} m={m} n={n} k={k} fp8={fp8} qa={qa}: {len(errs)} tilings, "
                      f"max rel err {err:.2e} ({worst})")
            # the SwiGLU down projection with its activation inside, at one size and the default tiles
            gated = [None] + ([sk.SkinnyTiles(4, 256, 4, 1, quant_ahead=True)] if qa else [])
            for t in gated:  # (and, quantized ahead, by the quantization launch)
                err = check(ms[-1], n, k, block, dtype, device, fp8, qa, t, gated=True)
                bad += err >= tol
                print(f"{'ok ' if err < tol else 'BAD'} gated m={ms[-1]} n={n} k={k} fp8={fp8} qa={qa} tiles={t}: "
                      f"rel err {err:.2e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
