"""Block-scaled FP8 GEMM (engine/kernels/fp8_gemm.py, activation quantization included) at
Qwen3-8B and DeepSeek-V3 linear-layer shapes, against floors measured in the same run: the FP8
matmul rate (torch._scaled_mm, per-tensor scales, 8192^3) and HBM copy bandwidth; bf16 F.linear
alongside. torch._scaled_mm with blockwise (1x128 activations, 128x128 weights) scales is timed
too where this torch/device supports it.

    python -m bench.fp8_gemm_bench --out DIR
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.nn.functional as F

from bench.device_probe import probe, time_ms
from engine.kernels.fp8_gemm import fp8_block_gemm, quantize_activation
from engine.quantization import quantize_blocks

SHAPES = {  # (N, K) of each weight
    "qwen3-8b qkv": (6144, 4096), "qwen3-8b o": (4096, 4096), "qwen3-8b gate_up": (24576, 4096),
    "qwen3-8b down": (4096, 12288),
    "dsv3 q_a": (1536, 7168), "dsv3 q_b": (24576, 1536), "dsv3 kv_a": (576, 7168), "dsv3 o": (7168, 16384),
    "dsv3 dense gate_up": (36864, 7168), "dsv3 dense down": (7168, 18432), "dsv3 shared gate_up": (4096, 7168),
}


def fp8_peak(device) -> float:
    n = 8192
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
    one = torch.tensor(1.0, device=device)
    ms = time_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    return 2 * n ** 3 / (ms / 1e3)


def scaled_mm_blockwise(x, w8, ws):
    """torch._scaled_mm with DeepSeek's scaling (1x128 activations, 128x128 weights), if supported."""
    a, a_s = quantize_activation(x, 128)
    return torch._scaled_mm(a, w8.t(), scale_a=a_s.t().contiguous().t(), scale_b=ws.t(), out_dtype=torch.bfloat16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 2048])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    p = probe("cuda")
    hbm, bf16_peak = p["hbm_copy_bytes_per_s"], p["bf16_matmul_flops_per_s"]
    peak = fp8_peak(dev)
    rows, blockwise_error = [], None
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev) * k ** -0.5
        w8, ws = quantize_blocks(w, (128, 128))
        wb = w.to(torch.bfloat16)
        del w
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ours = time_ms(lambda: fp8_block_gemm(x, w8, ws, (128, 128)))
            bf16 = time_ms(lambda: F.linear(x, wb))
            sm = None
            if blockwise_error is None:
                try:
                    sm = time_ms(lambda: scaled_mm_blockwise(x, w8, ws))
                except Exception as e:  # noqa: BLE001 - report why and stop trying
                    blockwise_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            flops = 2 * m * n * k
            bytes_ = n * k + m * k * 2 + m * n * 2  # FP8 weight + bf16 in/out (scales negligible)
            floor_ms = max(flops / peak, bytes_ / (hbm / 2)) * 1e3  # copy rate counts read+write
            rows.append(dict(shape=label, m=m, n=n, k=k, ours_ms=ours, bf16_ms=bf16, scaled_mm_blockwise_ms=sm,
                             floor_ms=floor_ms, ours_tflops=flops / ours / 1e9, floor_over_ours=floor_ms / ours,
                             speedup_vs_bf16=bf16 / ours))
        del w8, ws, wb
        torch.cuda.empty_cache()
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name(dev), torch=torch.__version__, hbm_copy_bytes_per_s=hbm,
                  bf16_peak_flops=bf16_peak, fp8_peak_flops=peak, scaled_mm_blockwise_error=blockwise_error,
                  rows=rows)
    lines = [f"FP8 peak (torch._scaled_mm 8192^3, same run): {peak / 1e12:.0f} TFLOP/s; bf16 {bf16_peak / 1e12:.0f} "
             f"TFLOP/s; HBM copy {hbm / 1e12:.2f} TB/s (read+write). Floor = max(FLOPs / FP8 peak, bytes / "
             f"(copy rate / 2)).", f"torch._scaled_mm blockwise: {blockwise_error or 'supported'}", "",
             "| shape (N x K) | M | ours ms | floor ms | floor/ours | TFLOP/s | bf16 ms | ours vs bf16 | "
             "_scaled_mm blockwise ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sm = f"{r['scaled_mm_blockwise_ms']:.3f}" if r["scaled_mm_blockwise_ms"] else "–"
        lines.append(f"| {r['shape']} ({r['n']}x{r['k']}) | {r['m']} | {r['ours_ms']:.3f} | {r['floor_ms']:.3f} | "
                     f"{r['floor_over_ours']:.0%} | {r['ours_tflops']:.0f} | {r['bf16_ms']:.3f} | "
                     f"{r['speedup_vs_bf16']:.2f}x | {sm} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fp8_gemm.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "fp8_gemm.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
