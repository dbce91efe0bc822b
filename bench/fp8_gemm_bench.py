"""Block-scaled FP8 GEMM (engine/kernels/fp8_gemm.py, activation quantization included) at
Qwen3-8B and DeepSeek-V3 linear-layer shapes, as the engine runs it (decode sizes: the tiles
`decode_gemm` times and keeps; prefill: the defaults), against floors measured in the same run: the
FP8 matmul rate (torch._scaled_mm, per-tensor scales, 8192^3) and the HBM copy rate (read+write,
the rate bench/roofline.py divides bytes by). Every time is per call inside a CUDA graph (decode
runs that way; launch cost is not the kernel's), each call on the next of the weight's rotating
copies as the tuner times them (before 2026-12-07's seventh session the same weight was reused, so a
weight that fits in L2 flattered every kernel at decode sizes). Alongside: bf16 `F.linear`; the Triton block GEMM in
its default tiles (what prefill ran before the tuner timed prefill sizes); cuBLAS's block-scaled GEMM
(`fp8_gemm.scaled_mm_gemm`, at every M, with why cuBLAS refused where it did); and torch._scaled_mm
with rowwise scales (per token, per output channel: coarser than the checkpoints' 128x128 blocks,
so not a substitute, timed as the rate cuBLAS reaches).

    python -m bench.fp8_gemm_bench --m 1,16,64,2048 --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools

import torch
import torch.nn.functional as F

from bench.device_probe import probe
from bench.record import emit
from bench.fp8_gemm_sweep import fp8_peak, graph_ms
from engine.kernels.fp8_gemm import fp8_block_gemm, gemm_tiles, scaled_mm_gemm
from engine.kernels import decode_gemm
from engine.quantization import quantize_blocks

SHAPES = {  # (N, K) of each weight
    "qwen3-8b qkv": (6144, 4096), "qwen3-8b o": (4096, 4096), "qwen3-8b gate_up": (24576, 4096),
    "qwen3-8b down": (4096, 12288),
    "dsv3 q_a": (1536, 7168), "dsv3 q_b": (24576, 1536), "dsv3 kv_a": (576, 7168), "dsv3 o": (7168, 16384),
    "dsv3 dense gate_up": (36864, 7168), "dsv3 dense down": (7168, 18432), "dsv3 shared gate_up": (4096, 7168),
}


def _try(fn, calls: int = 20):
    try:
        return graph_ms(fn, calls), None
    except Exception as e:  # noqa: BLE001 - record why
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _rotating(weight: torch.Tensor):
    """The weight's rotating copies (`decode_gemm.weight_copies`: twice the L2 in all), cycled one per
    call, so every timed call reads its weight from HBM as in a model step, and the number of calls per
    graph that covers them."""
    copies = decode_gemm.weight_copies(weight)
    return itertools.cycle(copies), max(20, len(copies))


def measure(label, n, k, ms_list, hbm, peak, state) -> list[dict]:
    w = torch.randn(n, k, device="cuda") * k ** -0.5
    w8, ws = quantize_blocks(w, (128, 128))
    wb, sb = w.to(torch.bfloat16), torch.ones(1, n, device="cuda")
    del w
    (c8, calls8), (cb, callsb) = _rotating(w8), _rotating(wb)
    rows = []
    for m in ms_list:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        tiles = decode_gemm.choose(x, w8, ws, (128, 128), True)
        ours = graph_ms(lambda: decode_gemm.run(tiles, x, next(c8), ws, (128, 128), True), calls8)
        w8a16 = graph_ms(lambda: decode_gemm.run(tiles, x, next(c8), ws, (128, 128), False), calls8)
        bf16 = graph_ms(lambda: F.linear(x, next(cb)), callsb)
        x8, sa = x.to(torch.float8_e4m3fn), torch.ones(m, 1, device="cuda")
        rowwise, row_err = _try(lambda: torch._scaled_mm(x8, next(c8).t(), scale_a=sa, scale_b=sb,
                                                         out_dtype=torch.bfloat16), calls8)
        # cuBLAS's block-scaled GEMM as the engine runs it (its quantization launch included), at every M
        blockwise, block_err = _try(lambda: scaled_mm_gemm(x, next(c8), ws), calls8)
        if block_err:
            state.setdefault("blockwise_errors", {})[f"{label} m={m}"] = block_err
        triton = graph_ms(lambda: fp8_block_gemm(x, next(c8), ws, (128, 128), True, gemm_tiles(m, n, k, False)),
                          calls8)
        flops, bytes_ = 2 * m * n * k, n * k + 2 * m * (n + k)  # FP8 weight + bf16 in/out (scales < 0.01%)
        floor = max(flops / peak, bytes_ / hbm) * 1e3
        rows.append(dict(shape=label, m=m, n=n, k=k, ours_ms=ours, tiles=_tiles_dict(tiles),
                         w8a16_ms=w8a16, bf16_ms=bf16, scaled_mm_rowwise_ms=rowwise, scaled_mm_rowwise_error=row_err,
                         scaled_mm_blockwise_ms=blockwise, scaled_mm_blockwise_error=block_err,
                         triton_default_ms=triton, floor_ms=floor, ours_tflops=flops / ours / 1e9,
                         floor_over_ours=floor / ours, speedup_vs_bf16=bf16 / ours))
    return rows


def _tiles_dict(tiles) -> dict:
    if isinstance(tiles, str):  # decode_gemm.SCALED_MM
        return dict(kernel="str", choice=tiles)
    return dict(dataclasses.asdict(tiles), kernel=type(tiles).__name__)


def _tiles_label(t: dict) -> str:
    if t["kernel"] == "SkinnyTiles":
        return f"skinny n{t['block_n']} k{t['block_k']} w{t['warps']} s{t['stages']}"
    if t["kernel"] == "str":
        return t["choice"]
    split = f" sk{t['split_k']}" if t["split_k"] > 1 else ""
    quant = " in-GEMM quant" if t["fuse_quant"] else ""
    return f"{t['block_m']}x{t['block_n']} w{t['warps']} s{t['stages']}{split}{quant}"


def markdown(result) -> str:
    hbm, fp8, bf16 = (result[key] / 1e12 for key in ("hbm_copy_bytes_per_s", "fp8_peak_flops", "bf16_peak_flops"))
    lines = [f"FP8 peak (torch._scaled_mm 8192^3, same run): {fp8:.0f} TFLOP/s; bf16 {bf16:.0f} TFLOP/s; "
             f"HBM copy {hbm:.2f} TB/s. Floor = max(FLOPs / FP8 peak, bytes / HBM copy rate). "
             "Times per call inside a CUDA graph, weights rotated (read from HBM).",
             "cuBLAS block-scaled (1x128, 128x128; `fp8_gemm.scaled_mm_gemm`, its quantization launch included) "
             f"refused at: {', '.join(result['scaled_mm_blockwise_errors']) or 'none'}"
             + (f" ({next(iter(result['scaled_mm_blockwise_errors'].values()))})"
                if result['scaled_mm_blockwise_errors'] else ""), "",
             "| shape (N x K) | M | ours ms | tiles | floor ms | floor/ours | TFLOP/s | bf16 ms | ours vs bf16 | "
             "W8A16 ms | Triton default ms | cuBLAS block ms | _scaled_mm rowwise ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rw, blk = ("–" if r.get(key) is None else f"{r[key]:.4f}"
                   for key in ("scaled_mm_rowwise_ms", "scaled_mm_blockwise_ms"))
        lines.append(f"| {r['shape']} ({r['n']}x{r['k']}) | {r['m']} | {r['ours_ms']:.4f} | "
                     f"{_tiles_label(r['tiles'])} | {r['floor_ms']:.4f} | {r['floor_over_ours']:.0%} | "
                     f"{r['ours_tflops']:.0f} | {r['bf16_ms']:.4f} | {r['speedup_vs_bf16']:.2f}x | "
                     f"{r['w8a16_ms']:.4f} | {r['triton_default_ms']:.4f} | {blk} | {rw} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 2048])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    p = probe("cuda")
    hbm, peak, state, rows = p["hbm_copy_bytes_per_s"], fp8_peak(), {}, []
    for label, (n, k) in SHAPES.items():
        rows += measure(label, n, k, args.m, hbm, peak, state)
        torch.cuda.empty_cache()
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name(), torch=torch.__version__, hbm_copy_bytes_per_s=hbm,
                  bf16_peak_flops=p["bf16_matmul_flops_per_s"], fp8_peak_flops=peak,
                  scaled_mm_blockwise_errors=state.get("blockwise_errors", {}), rows=rows)
    emit(result, markdown(result), args.out, "fp8_gemm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
