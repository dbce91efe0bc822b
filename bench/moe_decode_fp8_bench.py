"""DeepSeek-V2-Lite's MoE block after routing at decode sizes (1-4 tokens; 64 experts of width
1408, top-6, two shared experts as one 2816-wide MLP, random weights) with FP8 experts in 128x128
blocks: the two-kernel decode path (`moe_decode.decode_experts_fp8`, shared experts inside, W8A8
and weight-only, at its default tiles and a few others) against the path FP8 took before it (the
grouped FP8 GEMM with its quantization and alignment kernels, the shared MLP as FP8 GEMMs plus
SiLU-and-mul and an add) and the bf16 decode path, next to the floor: the FP8 bytes of the touched
experts and the shared MLP over the measured HBM copy rate. Each call is timed replayed from a
CUDA graph, as the engine runs it. `python -m bench.moe_decode_fp8_bench [--tokens 1,2,4] [--out DIR]`."""
from __future__ import annotations

import argparse
from unittest import mock

import torch
import torch.nn.functional as F

from bench.device_probe import probe
from bench.record import emit

# (up BLOCK_N, up K groups, down BLOCK_N, down K groups); the first is `moe_decode.fp8_decode_tiles`'s default
TILES = [(16, 4, 4, 4), (16, 2, 4, 2), (32, 4, 8, 4), (16, 4, 8, 2), (8, 4, 4, 4)]


def run(tokens_list, hidden=2048, num_experts=64, inter=1408, top_k=6, shared=2, block=(128, 128)) -> dict:
    from engine.kernels import moe_decode
    from engine.kernels.fp8_gemm import fp8_block_gemm
    from engine.kernels.fused_moe import fused_experts
    from engine.kernels.fused_moe_fp8 import fused_experts_fp8
    from engine.kernels.graph_timing import graph_time_ms
    from engine.kernels.norm_act import silu_and_mul
    from engine.layers.moe import select_experts
    from engine.quantization import quantize_blocks

    dev, dt = torch.device("cuda"), torch.bfloat16
    bw = probe("cuda")["hbm_copy_bytes_per_s"]
    gen = torch.Generator(device=dev).manual_seed(0)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=dev) * hidden ** -0.5).to(dt)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen, device=dev) * inter ** -0.5).to(dt)
    sw13 = (torch.randn(2 * shared * inter, hidden, generator=gen, device=dev) * hidden ** -0.5).to(dt)
    sw2 = (torch.randn(hidden, shared * inter, generator=gen, device=dev) * (shared * inter) ** -0.5).to(dt)
    (q13, s13), (q2, s2), (qs13, ss13), (qs2, ss2) = (quantize_blocks(w, block) for w in (w13, w2, sw13, sw2))
    fp8_shared = (qs13, ss13, qs2, ss2)
    gate = torch.randn(num_experts, hidden, generator=gen, device=dev) * 0.02
    rows = []
    for t in tokens_list:
        x = torch.randn(t, hidden, generator=gen, device=dev, dtype=dt)
        wts, ids = select_experts(F.linear(x.float(), gate), top_k, "softmax")
        experts = (x, q13, s13, q2, s2, wts, ids, block)
        touched = int(torch.unique(ids).numel())
        nbytes = touched * 3 * hidden * inter + 3 * hidden * shared * inter
        row = dict(tokens=t, touched_experts=touched, floor_ms=nbytes / bw * 1e3)

        def before(qa=True):
            sh = fp8_block_gemm(silu_and_mul(fp8_block_gemm(x, qs13, ss13, block, qa)), qs2, ss2, block, qa)
            with mock.patch.object(moe_decode, "MAX_TOKENS", 0):
                return fused_experts_fp8(*experts, qa) + sh
        row["fp8_grouped_before_ms"] = graph_time_ms(before)
        row["bf16_decode_ms"] = graph_time_ms(lambda: fused_experts(x, w13, w2, wts, ids, shared_weights=(sw13, sw2)))
        row["fp8_weight_only_ms"] = graph_time_ms(
            lambda: moe_decode.decode_experts_fp8(*experts, False, shared_weights=fp8_shared))
        for tiles in TILES:
            row[f"fp8_w8a8_{tiles}_ms"] = graph_time_ms(
                lambda: moe_decode.decode_experts_fp8(*experts, True, shared_weights=fp8_shared, tiles=tiles))
        rows.append(row)
    return {"hbm_copy_bytes_per_s": bw, "default_tiles": moe_decode.fp8_decode_tiles(False), "rows": rows,
            "shape": dict(hidden=hidden, experts=num_experts, inter=inter, top_k=top_k, shared=shared, block=block)}


def markdown(r: dict) -> str:
    keys = [k for k in r["rows"][0] if k.endswith("_ms")]
    lines = [f"HBM copy {r['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s (same run). Shape: {r['shape']}; default FP8 "
             f"tiles {r['default_tiles']}. Cells: ms per call (floor / ms).", "",
             "| tokens | experts | " + " | ".join(keys) + " |", "|---:|---:|" + "---:|" * len(keys)]
    for x in r["rows"]:
        cells = [f"{x[k]:.4f}" if k == "floor_ms" else f"{x[k]:.4f} ({x['floor_ms'] / x[k]:.0%})" for k in keys]
        lines.append(f"| {x['tokens']} | {x['touched_experts']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,2,4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = run([int(t) for t in args.tokens.split(",")])
    emit(result, markdown(result), args.out, "moe_decode_fp8")


if __name__ == "__main__":
    main()
