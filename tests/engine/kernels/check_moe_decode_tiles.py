"""Every tiling the decode-MoE tuner may pick (`moe_decode.UP_CANDIDATES` x `DOWN_CANDIDATES`, bf16
and FP8) against the torch references, then, on CUDA, the tuner itself: its choice for DeepSeek-V2-Lite's
block at 1, 2 and 4 tokens, the time of each candidate, and that the chosen tiles give the reference's
output. The tuner may pick any up tiling with any down tiling, so each up candidate runs with each down
candidate's partner in turn (lists zipped cyclically: every candidate of each kernel runs at least once).
Usage: python -m tests.engine.kernels.check_moe_decode_tiles [device] [small|v2lite]"""
from __future__ import annotations

import itertools
import os
import sys
import time

import torch

from engine.kernels import moe_decode, tuning_cache
from engine.kernels.fp8_ref import fused_experts_fp8_ref
from engine.kernels.fused_moe_ref import fused_experts_ref
from engine.quantization import quantize_blocks


def _inputs(t, e, h, i, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(device, dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=g) * h ** -0.5).to(device)
    w2 = (torch.randn(e, h, i, generator=g) * i ** -0.5).to(device)
    sw13 = (torch.randn(4 * i, h, generator=g) * h ** -0.5).to(device)
    sw2 = (torch.randn(h, 2 * i, generator=g) * (2 * i) ** -0.5).to(device)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(device, torch.int32)
    ids[::2, 0] = -1  # an expert on another rank
    wts = torch.rand(t, k, generator=g).to(device)
    return x, w13, w2, sw13, sw2, ids, wts


def _rel(ref, got) -> float:
    ref, got = ref.float(), got.float()
    return ((ref - got).abs().max() / ref.abs().max().clamp(min=1e-6)).item()


def pairs(fp8: bool) -> list[moe_decode.DecodeMoeTiles]:
    ups, downs = moe_decode.UP_CANDIDATES[fp8], moe_decode.DOWN_CANDIDATES[fp8]
    n = max(len(ups), len(downs))
    return [moe_decode._tiles_of(u, d) for u, d in itertools.islice(zip(itertools.cycle(ups), itertools.cycle(downs)), n)]


def check_bf16(t, e, h, i, k, dtype, device, tiles) -> float:
    x, w13, w2, sw13, sw2, ids, wts = _inputs(t, e, h, i, k, dtype, device)
    w13, w2, sw = w13.to(dtype), w2.to(dtype), (sw13.to(dtype), sw2.to(dtype))
    ref = fused_experts_ref(x, w13, w2, wts, ids, shared_weights=sw)
    return _rel(ref, moe_decode.decode_experts(x, w13, w2, wts, ids, shared_weights=sw, tiles=tiles))


def check_fp8(t, e, h, i, k, block, dtype, device, tiles, qa=True) -> float:
    x, w13, w2, sw13, sw2, ids, wts = _inputs(t, e, h, i, k, dtype, device)
    (q13, s13), (q2, s2), (qs13, ss13), (qs2, ss2) = (quantize_blocks(w, block) for w in (w13, w2, sw13, sw2))
    args = (x, q13, s13, q2, s2, wts, ids, block, qa)
    sw = (qs13, ss13, qs2, ss2)
    ref = fused_experts_fp8_ref(*args, shared_weights=sw)
    return _rel(ref, moe_decode.decode_experts_fp8(*args, shared_weights=sw, tiles=tiles))


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    size = sys.argv[2] if len(sys.argv) > 2 else "small"
    if size == "small":  # odd widths: every tile is partly masked
        shape, block, dtype, tol, tokens = (4, 40, 24, 2), (8, 16), torch.float32, 1e-4, (1,)
    else:  # DeepSeek-V2-Lite: 64 experts of width 1408, top-6, two shared experts
        shape, block, dtype, tol, tokens = (64, 2048, 1408, 6), (128, 128), torch.bfloat16, 2e-2, (1, 4)
    bad = 0
    for t in tokens:
        for fp8 in (False, True):
            for tiles in pairs(fp8):
                err = check_fp8(t, *shape, block, dtype, device, tiles) if fp8 else \
                    check_bf16(t, *shape, dtype, device, tiles)
                ok = err < tol
                bad += not ok
                print(f"{'ok ' if ok else 'BAD'} T={t} {'fp8 w8a8' if fp8 else str(dtype)} tiles={tuple(tiles)}: "
                      f"rel err {err:.2e}", flush=True)
    if device == "cuda":
        bad += tuned(shape, block, dtype, tol, device)
    return 1 if bad else 0


def tuned(shape, block, dtype, tol, device) -> int:
    """The tuner's choice per token bucket (timings logged per candidate), then that choice's output."""
    bad = 0
    timings: list[tuple] = []
    real = moe_decode.graph_time_ms

    def logged(fn, calls=10, reps=5):
        ms = real(fn, calls, reps)
        timings.append(ms)
        return ms
    moe_decode.graph_time_ms = logged
    os.environ[tuning_cache.ENV] = "off"  # time here, whatever a shared table already holds
    try:
        for fp8 in (False, True):
            for t in (1, 2, 4):
                timings.clear()
                moe_decode._chosen.clear()
                t0 = time.perf_counter()
                err = check_fp8(t, *shape, block, dtype, device, None) if fp8 else \
                    check_bf16(t, *shape, dtype, device, None)
                choice = next(iter(moe_decode._chosen.values()))
                default = moe_decode.default_tiles(fp8, False)
                ok = err < tol
                bad += not ok
                print(f"{'ok ' if ok else 'BAD'} tuned T={t} {'fp8' if fp8 else 'bf16'}: {tuple(choice)} "
                      f"(default {tuple(default)}), rel err {err:.2e}, tuning {time.perf_counter() - t0:.1f} s, "
                      f"candidate ms {[round(m, 4) for m in timings]}", flush=True)
    finally:
        moe_decode.graph_time_ms = real
    return bad


if __name__ == "__main__":
    sys.exit(main())
