"""Tile sweep of the MLA decode kernel (engine/kernels/mla_decode.py): every (heads per program,
positions per tile, warps, pipeline stages, splits) candidate at DeepSeek-V3's 128 heads and
V2-Lite's 16, batch 1/16/64/128, one context length. Each candidate is timed as a CUDA graph
replay of the kernel alone and checked against the torch reference; the table is what
`choose_config`'s hard-coded rule was read from. Candidates compile in parallel worker processes
first (Triton's on-disk cache), then one process times them.
`python -m bench.mla_decode_sweep --out DIR [--context 4096] [--workers 14]`."""
from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp

import torch

from bench.record import emit
from engine.kernels.graph_timing import graph_time_ms

PAGE, R, P = 16, 512, 64
BATCHES = (1, 16, 64, 128)
TILES = {  # heads → (block_h, block_n, warps, stages, value splits) candidates
    128: [*itertools.product((64, 32), (32, 64), (4, 8), (1, 2, 3), (1,)), (64, 16, 8, 2, 1), (64, 16, 8, 3, 1),
          (64, 16, 4, 3, 1), (64, 64, 4, 2, 2), (64, 64, 4, 3, 2), (64, 32, 4, 3, 2), (64, 64, 8, 3, 2)],
    16: list(itertools.product((16,), (32, 64, 128), (4, 8), (1, 2, 3), (1,))),
}


def _inputs(heads: int, batch: int, ctx: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    pages = -(-ctx // PAGE)
    perm = torch.randperm(batch * pages, device="cuda", generator=g).int() + 1
    tables = perm.view(batch, pages)
    cache = torch.randn(batch * pages + 1, 1, PAGE, 1, R + P, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(batch, heads, R + P, device="cuda", dtype=torch.bfloat16, generator=g)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return q, cache, tables, seq_lens


def _splits(heads: int, batch: int, tile: tuple, sms: int) -> list[int]:
    base = max(1, min(32, sms // (batch * -(-heads // tile[0]) * tile[4])))
    return sorted({max(1, base // 2), base, base * 2})


def _tasks(ctx: int, sms: int, only: dict | None = None) -> list[tuple]:
    tiles_by_heads = only or TILES
    return [(heads, batch, ctx, tile, splits) for heads, tiles in tiles_by_heads.items() for batch in BATCHES
            for tile in tiles for splits in _splits(heads, batch, tile, sms)]


def _config(tile, splits):
    from engine.kernels.mla_decode import MLADecodeConfig

    return MLADecodeConfig(tile[0], tile[1], splits, tile[2], tile[3], tile[4])


def _compile(tasks: list[tuple]) -> int:
    """Worker: run each candidate once so Triton compiles it into the shared cache."""
    from engine.kernels.mla_decode import mla_decode

    cached, failed = {}, 0
    for heads, batch, ctx, tile, splits in tasks:
        if (heads, batch) not in cached:
            cached = {(heads, batch): _inputs(heads, batch, ctx)}
        q, cache, tables, seq_lens = cached[(heads, batch)]
        try:
            mla_decode(q, cache, tables, seq_lens, 0.04, R, config=_config(tile, splits))
        except Exception:  # noqa: BLE001 — out of shared memory or registers: the timing pass reports it
            failed += 1
    torch.cuda.synchronize()
    return failed


def run(ctx: int, workers: int, only: dict | None = None) -> dict:
    from engine.kernels.mla_decode import mla_decode, mla_decode_ref

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tasks = _tasks(ctx, sms, only)
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_compile, [tasks[i::workers] for i in range(workers)])
    rows = []
    for (heads, batch), group in itertools.groupby(tasks, key=lambda t: (t[0], t[1])):
        q, cache, tables, seq_lens = _inputs(heads, batch, ctx)
        ref = mla_decode_ref(q, cache, tables, seq_lens, 0.04, R).float()
        kv_bytes, flops = batch * ctx * (R + P) * 2, 2 * batch * heads * ctx * (2 * R + P)
        for _, _, _, tile, splits in group:
            row = dict(heads=heads, batch=batch, context=ctx, block_h=tile[0], block_n=tile[1], warps=tile[2],
                       stages=tile[3], value_splits=tile[4], splits=splits)
            fn = lambda: mla_decode(q, cache, tables, seq_lens, 0.04, R, config=_config(tile, splits))  # noqa: E731
            try:
                row["err"] = (fn().float() - ref).abs().max().item()
                row["us"] = graph_time_ms(fn, calls=4) * 1e3
                row["gbps"] = kv_bytes / row["us"] / 1e3
                row["tflops"] = flops / row["us"] / 1e6
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
            rows.append(row)
            print(row, flush=True)
    return {"device": torch.cuda.get_device_name(0), "sms": sms, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']} ({result['sms']} SMs). Kernel alone, CUDA graph replay, µs per call.", "",
             "| heads | batch | ctx | block_h | block_n | warps | stages | value splits | splits | µs | GB/s KV | "
             "TFLOP/s | max err |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    best = {}
    for r in result["rows"]:
        key = (r["heads"], r["batch"])
        if "us" in r and r["err"] < 5e-2 and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
        cells = (f"{r['us']:.1f} | {r['gbps']:.0f} | {r['tflops']:.0f} | {r['err']:.1e}" if "us" in r
                 else f"{r.get('error', '?')} | | |")
        lines.append(f"| {r['heads']} | {r['batch']} | {r['context']} | {r['block_h']} | {r['block_n']} | "
                     f"{r['warps']} | {r['stages']} | {r.get('value_splits', 1)} | {r['splits']} | {cells} |")
    lines += ["", "Best per shape:", ""]
    for (heads, batch), r in sorted(best.items()):
        lines.append(f"- heads {heads}, batch {batch}: block_h {r['block_h']}, block_n {r['block_n']}, warps "
                     f"{r['warps']}, stages {r['stages']}, value splits {r.get('value_splits', 1)}, splits "
                     f"{r['splits']}: {r['us']:.1f} µs, "
                     f"{r['gbps']:.0f} GB/s, {r['tflops']:.0f} TFLOP/s")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--heads", type=int, default=None, help="only this head count's candidates")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = run(args.context, args.workers, {args.heads: TILES[args.heads]} if args.heads else None)
    emit(result, markdown(result), args.out, "mla_decode_sweep")


if __name__ == "__main__":
    main()
