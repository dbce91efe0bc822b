"""Paged attention kernels at real sizes, each next to its floor (one layer).

* Decode (one query token per sequence, split-KV Triton kernels): the floor is the larger of the
  KV-read time — batch · context · bytes per token of one layer over the measured HBM copy
  bandwidth — and the attention FLOPs over the measured matmul rate; the KV-read part alone is
  reported too (MLA at 128 heads does ~240 FLOPs per cached byte, above the H100/H200 ridge, so
  its real floor is the FLOPs one). GQA at Qwen3-8B's shape (32 query heads, 8 KV heads, head dim
  128); MLA absorbed (one 512 + 64 latent) at DeepSeek-V3's 128 heads and V2-Lite's 16.
* Prefill (whole prompt, causal): the floor is the attention FLOPs — 2 · 2 · heads · L²/2 ·
  (qk dim + v dim)/2 per sequence — over the measured bf16 matmul rate.

Times are CUDA-event medians through the engine's attention backend (`TritonAttentionBackend`), so
they include its KV write of the new tokens, as a real step does; decode is timed as a CUDA graph
replay (as the engine runs it), prefill as eager calls. `python -m bench.attention_bench
--out DIR` prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse

import torch

from bench.device_probe import probe, time_ms
from bench.record import emit

SHAPES = {
    "gqa": dict(heads=32, kv_heads=8, head_dim=128, label="GQA (Qwen3-8B: 32 q / 8 kv heads × 128)"),
    "mla": dict(heads=128, latent=512, rope=64, label="MLA absorbed (DeepSeek-V3: 128 heads, 512 + 64 latent)"),
    "mla16": dict(heads=16, latent=512, rope=64, label="MLA absorbed (DeepSeek-V2-Lite: 16 heads, 512 + 64 latent)"),
}


def _meta(batch: int, query_len: int, ctx: int, page_size: int, device):
    from engine.attention.metadata import AttentionMetadata

    seq = ctx + query_len
    pages = -(-seq // page_size)
    tables = [list(range(1 + b * pages, 1 + (b + 1) * pages)) for b in range(batch)]
    return AttentionMetadata.build([query_len] * batch, [seq] * batch, tables, page_size, device), 1 + batch * pages


def run_case(kind: str, phase: str, batch: int, ctx: int, page_size: int, bw: float, rate: float,
             repeats: int) -> dict:
    from engine.attention.triton_backend import TritonAttentionBackend

    dev, dt = torch.device("cuda"), torch.bfloat16
    backend = TritonAttentionBackend()
    s = SHAPES[kind]
    query_len = 1 if phase == "decode" else ctx
    context = ctx if phase == "decode" else 0
    meta, num_pages = _meta(batch, query_len, context, page_size, dev)
    t = batch * query_len
    seq = context + query_len
    if kind == "gqa":
        d, kvh, h = s["head_dim"], s["kv_heads"], s["heads"]
        cache = torch.randn(num_pages, 2, page_size, kvh, d, device=dev, dtype=dt)
        q = torch.randn(t, h, d, device=dev, dtype=dt)
        k = torch.randn(t, kvh, d, device=dev, dtype=dt)
        v = torch.randn(t, kvh, d, device=dev, dtype=dt)
        fn = lambda: backend.gqa(q, k, v, cache, meta, d ** -0.5)  # noqa: E731
        kv_bytes_per_token = 2 * kvh * d * 2
        qk_dim = v_dim = d
    else:  # mla, mla16
        r, p, h = s["latent"], s["rope"], s["heads"]
        cache = torch.randn(num_pages, 1, page_size, 1, r + p, device=dev, dtype=dt)
        q = torch.randn(t, h, r + p, device=dev, dtype=dt)
        lat = torch.randn(t, r + p, device=dev, dtype=dt)
        fn = lambda: backend.mla(q, lat, cache, meta, (r + p) ** -0.5, r)  # noqa: E731
        kv_bytes_per_token = (r + p) * 2
        qk_dim, v_dim = r + p, r
    ms = time_ms(_graphed(fn) if phase == "decode" else fn, repeats)
    kv_bytes = batch * seq * kv_bytes_per_token
    if phase == "decode":
        flops = 2 * batch * h * seq * (qk_dim + v_dim)
    else:
        flops = 2 * batch * h * (seq * (seq + 1) // 2) * (qk_dim + v_dim)
    kv_floor_ms = kv_bytes / bw * 1e3
    floor_ms = max(flops / rate * 1e3, kv_floor_ms)
    return dict(kind=kind, phase=phase, batch=batch, context=seq, ms=ms, kv_bytes=kv_bytes, flops=flops,
                floor_ms=floor_ms, pct_of_floor=100 * floor_ms / ms, kv_floor_ms=kv_floor_ms,
                pct_of_kv_floor=100 * kv_floor_ms / ms,
                achieved_gbps=kv_bytes / (ms / 1e3) / 1e9 if phase == "decode" else None,
                achieved_tflops=flops / (ms / 1e3) / 1e12)


def _graphed(fn):
    """`fn` captured once in a CUDA graph (after a warm-up call that compiles); returns its replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


CASES = [("gqa", "decode", b, c) for b, c in ((1, 4096), (16, 4096), (64, 2048), (128, 4096))] + \
        [(k, "decode", b, c) for k in ("mla", "mla16") for b in (1, 16, 64, 128) for c in (1024, 4096)] + \
        [("gqa", "prefill", 1, c) for c in (2048, 8192)] + [("mla", "prefill", 1, c) for c in (2048, 8192)]


def run(page_size: int = 16, repeats: int = 20, kinds: tuple[str, ...] = tuple(SHAPES),
        phases: tuple[str, ...] = ("decode", "prefill")) -> dict:
    p = probe()
    rows = [run_case(k, ph, b, c, page_size, p["hbm_copy_bytes_per_s"], p["bf16_matmul_flops_per_s"], repeats)
            for k, ph, b, c in CASES if k in kinds and ph in phases]
    return {"device": p, "page_size": page_size, "rows": rows}


def markdown(result: dict) -> str:
    p = result["device"]
    lines = [f"Device: {p['device']}; HBM copy {p['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s (r+w), "
             f"bf16 matmul {p['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s (same run). Page size "
             f"{result['page_size']}, bf16.", ""]
    for k in SHAPES:
        lines.append(f"- {k}: {SHAPES[k]['label']}")
    lines += ["", "| kernel | phase | batch | context | µs | floor µs | % of floor | KV-read floor µs | "
              "% of KV-read floor | achieved |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        ach = (f"{r['achieved_gbps']:.0f} GB/s KV, {r['achieved_tflops']:.0f} TFLOP/s"
               if r["achieved_gbps"] is not None else f"{r['achieved_tflops']:.0f} TFLOP/s")
        lines.append(f"| {r['kind']} | {r['phase']} | {r['batch']} | {r['context']} | {r['ms'] * 1e3:.1f} | "
                     f"{r['floor_ms'] * 1e3:.1f} | {r['pct_of_floor']:.0f}% | {r['kv_floor_ms'] * 1e3:.1f} | "
                     f"{r['pct_of_kv_floor']:.0f}% | {ach} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--kinds", default=",".join(SHAPES), help="comma-separated subset of " + ", ".join(SHAPES))
    ap.add_argument("--phases", default="decode,prefill")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = run(args.page_size, args.repeats, tuple(args.kinds.split(",")), tuple(args.phases.split(",")))
    emit(result, markdown(result), args.out, "attention")

if __name__ == "__main__":
    main()
