"""The Triton GEMV (engine/kernels/gemv.py) against `torch.nn.functional.linear`.
Usage: python -m tests.engine.kernels.check_gemv [device] [small|real]"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from engine.kernels.gemv import CONFIGS, gemv


def cases(size: str):
    if size == "small":  # odd N and K exercise the masks
        return [(1, 40, 300), (2, 33, 512), (3, 8, 700), (4, 64, 256)]
    return [(1, 6144, 4096), (1, 4096, 4096), (1, 24576, 4096), (1, 4096, 12288), (2, 4096, 14336), (4, 6144, 4096)]


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    size = sys.argv[2] if len(sys.argv) > 2 else "small"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for m, n, k in cases(size):
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
        ref = F.linear(x.float(), w.float())
        for config in CONFIGS:
            got = gemv(x, w, config).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            ok = err < (1e-5 if dtype == torch.float32 else 1e-2)
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} gemv M={m} N={n} K={k} {config} {dtype}: rel err {err:.1e}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
