"""Tile sweep of the block-scaled FP8 GEMM (engine/kernels/fp8_gemm.py) on one GPU: for a few
Qwen3-8B / DeepSeek-V3 weight shapes and token counts, every candidate `GemmTiles` timed inside a
CUDA graph (as decode runs it), next to bf16 `F.linear` and `torch._scaled_mm` with rowwise scales
(per-token activation, per-channel weight: a different, coarser scaling than the checkpoints' 128x128
blocks, timed only as the rate cuBLAS reaches). Floor: weight + activation bytes at the HBM copy
rate measured in the same run (read+write, as bench/roofline.py counts it), or FLOPs at the FP8
matmul rate of `torch._scaled_mm` (per-tensor scales, 8192^3), whichever is larger.

    python -m bench.fp8_gemm_sweep --out DIR
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from bench.device_probe import probe
from engine.kernels.fp8_gemm import GemmTiles, fp8_block_gemm
from engine.kernels.graph_timing import graph_time_ms
from engine.quantization import quantize_blocks

SHAPES = {"qwen3-8b qkv": (6144, 4096), "qwen3-8b gate_up": (24576, 4096), "qwen3-8b down": (4096, 12288),
          "dsv3 kv_a": (576, 7168), "dsv3 dense gate_up": (36864, 7168)}
DECODE = [GemmTiles(16, n, w, s) for n in (16, 32, 64) for w, s in ((4, 4), (4, 6), (2, 6))] + [
    GemmTiles(16, 64, 4, 4, split_k=4), GemmTiles(16, 128, 4, 4, split_k=4),
    GemmTiles(16, 32, 4, 6, fuse_quant=False), GemmTiles(16, 64, 4, 4, fuse_quant=False)]
MID = [GemmTiles(64, n, w, s) for n in (32, 64) for w, s in ((4, 4), (4, 6))]
MID += [GemmTiles(32, 32, 4, 6), GemmTiles(64, 64, 4, 4, fuse_quant=False)]
PREFILL = [GemmTiles(128, 128, 8, 3, fuse_quant=False), GemmTiles(128, 128, 8, 4, fuse_quant=False),
           GemmTiles(128, 128, 4, 4, fuse_quant=False), GemmTiles(128, 256, 8, 3, fuse_quant=False),
           GemmTiles(64, 128, 4, 4, fuse_quant=False), GemmTiles(128, 128, 8, 4, fuse_quant=True),
           GemmTiles(128, 64, 4, 4, fuse_quant=False)]
CANDIDATES = {1: DECODE, 16: DECODE, 64: MID, 2048: PREFILL}


def graph_ms(fn, calls: int = 20, repeats: int = 5) -> float:
    """Per-call time of `fn` replayed from a CUDA graph of `calls` back-to-back calls (no launch cost):
    the tuner's own timer, so the sweep ranks tilings as the engine's warm-up does."""
    return graph_time_ms(fn, calls, repeats)


def fp8_peak() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.tensor(1.0, device="cuda")
    return 2 * n ** 3 / (graph_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one,
                                                             out_dtype=torch.bfloat16), calls=5) / 1e3)


def sweep(ms_list, shapes, hbm, peak) -> list[dict]:
    rows = []
    for label, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda") * k ** -0.5
        w8, ws = quantize_blocks(w, (128, 128))
        wb, wt = w.to(torch.bfloat16), w8.t()
        sb = torch.ones(1, n, device="cuda")
        del w
        for m in ms_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x8, sa = x.to(torch.float8_e4m3fn), torch.ones(m, 1, device="cuda")
            floor = max(2 * m * n * k / peak, (n * k + 2 * m * (n + k)) / hbm) * 1e3
            row = dict(shape=label, n=n, k=k, m=m, floor_ms=floor, bf16_ms=graph_ms(lambda: F.linear(x, wb)))
            try:
                row["scaled_mm_rowwise_ms"] = graph_ms(lambda: torch._scaled_mm(
                    x8, wt, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
            except Exception as e:  # noqa: BLE001 - record why
                row["scaled_mm_rowwise_ms"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            row["tiles"] = []
            for t in CANDIDATES[m]:
                try:
                    ms = graph_ms(lambda: fp8_block_gemm(x, w8, ws, (128, 128), True, t))
                except Exception as e:  # noqa: BLE001 - a config that does not compile/fit
                    ms = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                row["tiles"].append(dict(tiles=vars(t), ms=ms))
            ok = [r for r in row["tiles"] if isinstance(r["ms"], float)]
            best = min(ok, key=lambda r: r["ms"])
            row["best"] = best
            rw = row["scaled_mm_rowwise_ms"]
            print(f"{label} ({n}x{k}) M={m}: floor {floor:.4f} bf16 {row['bf16_ms']:.4f} "
                  f"rowwise {rw if isinstance(rw, str) else round(rw, 4)} "
                  f"best {best['ms']:.4f} ({floor / best['ms']:.0%} of floor) {best['tiles']}", flush=True)
            for r in row["tiles"]:
                print(f"    {r['tiles']} {r['ms'] if isinstance(r['ms'], str) else round(r['ms'], 4)}", flush=True)
            rows.append(row)
        w8 = ws = wb = wt = None  # this shape's weights go before the next shape's are made
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 2048])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    p = probe("cuda")
    hbm, peak = p["hbm_copy_bytes_per_s"], fp8_peak()
    print(f"HBM copy {hbm / 1e12:.2f} TB/s, FP8 peak {peak / 1e12:.0f} TFLOP/s, bf16 "
          f"{p['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    rows = sweep(args.m, SHAPES, hbm, peak)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fp8_gemm_sweep.json"), "w") as f:
            json.dump(dict(probe=p, fp8_peak_flops=peak, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
