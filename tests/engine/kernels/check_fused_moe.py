"""Compares the Triton fused MoE with the torch reference (interpreter on CPU, native on CUDA).
Usage: python -m tests.engine.kernels.check_fused_moe [device] [small|v2lite|real]"""
from __future__ import annotations

import sys

import torch

from engine.kernels.fused_moe import align_by_expert, fused_experts
from engine.kernels.fused_moe_ref import fused_experts_ref


def check(t, e, h, i, k, dtype, device, seed=0, drop=True, shared=None) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(device, dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=g) * h ** -0.5).to(device, dtype)
    w2 = (torch.randn(e, h, i, generator=g) * i ** -0.5).to(device, dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(device, torch.int32)
    if drop:
        ids[::3, 0] = -1  # experts on another rank
    wts = torch.rand(t, k, generator=g).to(device)
    sh = sw = None
    if shared == "output":
        sh = torch.randn(t, h, generator=g).to(device, dtype)
    elif shared == "weights":  # two shared experts' merged MLP
        sw = ((torch.randn(4 * i, h, generator=g) * h ** -0.5).to(device, dtype),
              (torch.randn(h, 2 * i, generator=g) * (2 * i) ** -0.5).to(device, dtype))
    ref = fused_experts_ref(x, w13, w2, wts, ids, shared_output=sh, shared_weights=sw).float()
    got = fused_experts(x, w13, w2, wts, ids, sh, sw).float()
    return ((ref - got).abs().max() / ref.abs().max().clamp(min=1e-6)).item()


def check_alignment(device) -> None:
    ids = torch.tensor([[2, 0], [2, -1], [5, 2]], dtype=torch.int32, device=device)
    slots, experts = align_by_expert(ids, 6, 4)
    per_block = slots.view(-1, 4).tolist()
    got = {int(e): sorted(s for s in blk if s < 6) for e, blk in zip(experts.tolist(), per_block) if e >= 0}
    assert got == {0: [1], 2: [0, 2, 5], 5: [4]}, got


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    size = sys.argv[2] if len(sys.argv) > 2 else "small"
    check_alignment(device)
    if size == "small":
        # T=1 and 3 take moe_decode (GEMV + combine), 5 and 33 the grouped GEMM; odd I and H check masks
        cases = [(t, 8, 64, 32, 2) for t in (1, 5, 33)] + [(3, 8, 40, 24, 3)]
        dtypes = [torch.float32]
    elif size == "v2lite":  # DeepSeek-V2-Lite as the engine runs it: the decode path (1, 3), the grouped
        cases = [(t, 64, 2048, 1408, 6) for t in (1, 3, 16, 2048)]  # one (16, 2048), shared experts' weights
        dtypes = [torch.bfloat16]
    else:
        cases = [(t, 64, 2048, 1408, 6) for t in (1, 16, 64, 2048)] + [(t, 128, 2048, 768, 8) for t in (1, 64)]
        dtypes = [torch.bfloat16]
    bad = 0
    for dtype in dtypes:
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for t, e, h, i, k in cases:
            for shared in ("weights",) if size == "v2lite" else (None, "output", "weights"):
                err = check(t, e, h, i, k, dtype, device, shared=shared)
                ok = err < tol
                bad += not ok
                print(f"{'ok ' if ok else 'BAD'} T={t} E={e} H={h} I={i} k={k} shared={shared} {dtype}: "
                      f"rel err {err:.2e}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
