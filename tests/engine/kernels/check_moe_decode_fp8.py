"""Compares the FP8 decode MoE kernels (`moe_decode.decode_experts_fp8`, two kernels with the
activations quantized inside them) with `fp8_ref.fused_experts_fp8_ref` (interpreter on CPU, native
on CUDA), for W8A8 and weight-only, with the shared experts absent, as an output, or as FP8 weights.
Usage: python -m tests.engine.kernels.check_moe_decode_fp8 [device] [small|v2lite]"""
from __future__ import annotations

import sys

import torch

from engine.kernels.fp8_ref import fused_experts_fp8_ref
from engine.kernels.fused_moe_fp8 import fused_experts_fp8
from engine.kernels.moe_decode import MAX_TOKENS, decode_experts_fp8, fp8_decode_tiles
from engine.quantization import quantize_blocks


def check(t, e, h, i, k, block, dtype, device, quantize_activations, shared=None, tiles=None, seed=0) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(device, dtype)
    w13, s13 = quantize_blocks((torch.randn(e, 2 * i, h, generator=g) * h ** -0.5).to(device), block)
    w2, s2 = quantize_blocks((torch.randn(e, h, i, generator=g) * i ** -0.5).to(device), block)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(device, torch.int32)
    ids[::2, 0] = -1  # experts on another rank, below and above [0, E)
    ids[1::3, -1] = e
    wts = torch.rand(t, k, generator=g).to(device)
    sh = sw = None
    if shared == "output":
        sh = torch.randn(t, h, generator=g).to(device, dtype)
    elif shared == "weights":  # two shared experts' merged MLP, FP8 in the same blocks
        sw13, ss13 = quantize_blocks((torch.randn(4 * i, h, generator=g) * h ** -0.5).to(device), block)
        sw2, ss2 = quantize_blocks((torch.randn(h, 2 * i, generator=g) * (2 * i) ** -0.5).to(device), block)
        sw = (sw13, ss13, sw2, ss2)
    args = (x, w13, s13, w2, s2, wts, ids, block, quantize_activations)
    ref = fused_experts_fp8_ref(*args, shared_output=sh, shared_weights=sw).float()
    got = decode_experts_fp8(*args, shared_output=sh, shared_weights=sw, tiles=tiles).float()
    if shared == "weights" and tiles is None:  # the grouped path's entry point takes this one at decode sizes
        assert torch.equal(fused_experts_fp8(*args, shared_output=sh, shared_weights=sw).float(), got)
    return ((ref - got).abs().max() / ref.abs().max().clamp(min=1e-6)).item()


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    size = sys.argv[2] if len(sys.argv) > 2 else "small"
    if size == "small":
        # Several scale blocks along both dims of every matrix; I = 24 puts the up rows' first block
        # across the gate/up boundary, H = 72 ends in a partial block, bk = 24 is not a power of two;
        # the GPU's tiles (four K groups per iteration, some past the end) at one case.
        cases = [(1, 8, 64, 32, 2, (16, 32), None), (3, 8, 72, 24, 3, (16, 32), None),
                 (2, 6, 72, 40, 2, (16, 24), None), (3, 8, 72, 24, 3, (16, 32), fp8_decode_tiles(on_cpu=False))]
        dtype, tol = torch.float32, 1e-4
    else:  # DeepSeek-V2-Lite: 64 experts of width 1408, top-6, two shared experts, 128x128 blocks
        cases = [(t, 64, 2048, 1408, 6, (128, 128), None) for t in range(1, MAX_TOKENS + 1)]
        dtype, tol = torch.bfloat16, 2e-2
    bad = 0
    for t, e, h, i, k, block, tiles in cases:
        # W8A8 with every shared-expert form, weight-only with the shared experts' FP8 weights
        modes = ((True, None), (True, "output"), (True, "weights"), (False, "weights")) if tiles is None else \
            ((True, "weights"),)
        for qa, shared in modes:
            err = check(t, e, h, i, k, block, dtype, device, qa, shared, tiles)
            ok = err < tol
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} T={t} E={e} H={h} I={i} k={k} block={block} qa={qa} "
                  f"shared={shared} tiles={tiles} {dtype}: rel err {err:.2e}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
