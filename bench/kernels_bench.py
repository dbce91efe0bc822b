"""Each fused kernel against what the engine ran before it, at Qwen3-8B and DeepSeek-V2-Lite
shapes (bf16), next to its bytes floor.

Per-token ops are launch- and latency-bound at decode sizes, and the engine runs them inside a
CUDA graph, so each op is timed as a graph of `REPLAYS` back-to-back calls (GPU time per call,
host launch cost excluded — as in a decode step). Baselines: the torch references of
`engine/kernels/*_ref.py` — for the GQA prologue, the engine's previous composition (torch q/k
norm and rotary, then the Triton KV write). Floors: bytes each op must read and write once over
the measured HBM copy rate. Dense prefill (eager, one 2k-token sequence): SDPA with
`enable_gqa`, SDPA over heads expanded to Hq, and the Triton paged prefill kernel, against the
causal attention FLOPs floor.

    python -m bench.kernels_bench --out DIR
"""
from __future__ import annotations

import argparse

import torch

from bench.device_probe import probe, time_ms
from bench.record import emit
from engine.kernels.graph_timing import graph_time_ms

REPLAYS = 20
DEVICE = "cuda"  # `--smoke` runs every row once on CPU (Triton interpreter) to check the script itself
QWEN3_8B = dict(hidden=4096, inter=12288, hq=32, hkv=8, d=128)
V2_LITE = dict(hidden=2048, experts=64, top_k=6)


def graph_ms(fn, repeats: int) -> float:
    """GPU ms per call of `fn`, from a CUDA graph of REPLAYS calls."""
    if DEVICE == "cpu":
        return _cpu_ms(fn)
    return graph_time_ms(fn, REPLAYS, repeats)


def _cpu_ms(fn, repeats: int = 1) -> float:
    import time
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _row(op, shape, tokens, fused, ref, nbytes, bw, repeats) -> dict:
    f, r = graph_ms(fused, repeats), graph_ms(ref, repeats)
    floor = nbytes / bw * 1e3
    return {"op": op, "shape": shape, "tokens": tokens, "fused_ms": f, "ref_ms": r, "floor_ms": floor,
            "speedup": r / f, "pct_of_floor": 100 * floor / f}


def norm_act_rows(tokens, bw, repeats) -> list[dict]:
    from engine.kernels import norm_act, norm_act_ref
    h, i = QWEN3_8B["hidden"], QWEN3_8B["inter"]
    dev, dt = DEVICE, torch.bfloat16
    x, r = torch.randn(tokens, h, device=dev, dtype=dt), torch.randn(tokens, h, device=dev, dtype=dt)
    w = torch.randn(h, device=dev, dtype=dt)
    gu = torch.randn(tokens, 2 * i, device=dev, dtype=dt)
    shape = "Qwen3-8B"
    return [
        _row("rms_norm", f"{shape} H={h}", tokens, lambda: norm_act.rms_norm(x, w, 1e-6),
             lambda: norm_act_ref.rms_norm(x, w, 1e-6), 4 * tokens * h, bw, repeats),
        _row("add_rms_norm", f"{shape} H={h}", tokens, lambda: norm_act.add_rms_norm(x, r, w, 1e-6),
             lambda: norm_act_ref.add_rms_norm(x, r, w, 1e-6), 8 * tokens * h, bw, repeats),
        _row("silu_and_mul", f"{shape} I={i}", tokens, lambda: norm_act.silu_and_mul(gu),
             lambda: norm_act_ref.silu_and_mul(gu), 6 * tokens * i, bw, repeats),
    ]


def rope_kv_row(tokens, bw, repeats) -> dict:
    from engine.kernels import norm_act_ref, paged_attention, rope_kv
    from engine.kernels.rope_kv_ref import apply_rope
    hq, hkv, d = QWEN3_8B["hq"], QWEN3_8B["hkv"], QWEN3_8B["d"]
    dev, dt, page = DEVICE, torch.bfloat16, 16
    pages = tokens // page + 2
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device=dev, dtype=dt)
    pos = torch.arange(tokens, device=dev)
    freqs = torch.outer(torch.arange(4096, device=dev).float(), 1e6 ** -(torch.arange(0, d, 2, device=dev) / d))
    cos, sin = freqs.cos(), freqs.sin()
    qn, kn = torch.ones(d, device=dev, dtype=dt), torch.ones(d, device=dev, dtype=dt)
    cache = torch.zeros(pages, 2, page, hkv, d, device=dev, dtype=dt)
    slots = torch.arange(tokens, device=dev)

    def before():  # the engine's previous GQA prologue on CUDA
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)
        q, k = norm_act_ref.rms_norm(q, qn, 1e-6), norm_act_ref.rms_norm(k, kn, 1e-6)
        q, k = apply_rope(q, pos, cos, sin, False), apply_rope(k, pos, cos, sin, False)
        paged_attention.write_kv(cache, 0, k, slots)
        paged_attention.write_kv(cache, 1, v, slots)
        return q

    nbytes = 2 * tokens * d * ((hq + 2 * hkv) + (hq + hkv) + 2 * hkv)  # read qkv; write q, k; write k, v to pages
    return _row("qk_norm_rope_write_kv", f"Qwen3-8B Hq={hq} Hkv={hkv} D={d}", tokens,
                lambda: rope_kv.qk_norm_rope_write_kv(qkv, pos, cos, sin, qn, kn, 1e-6, cache, slots, hq, hkv),
                before, nbytes, bw, repeats)


def moe_rows(tokens, bw, repeats) -> list[dict]:
    from engine.kernels import moe_routing, moe_routing_ref
    from engine.kernels.fused_moe import _tiles
    e, k = V2_LITE["experts"], V2_LITE["top_k"]
    logits = torch.randn(tokens, e, device=DEVICE)
    rows = [_row("select_experts softmax", f"V2-Lite E={e} k={k}", tokens,
                 lambda: moe_routing.select_experts(logits, k), lambda: moe_routing_ref.select_experts(logits, k),
                 tokens * e * 4 + tokens * k * 8, bw, repeats)]
    v3 = torch.randn(tokens, 256, device=DEVICE)
    bias = torch.randn(256, device=DEVICE) * 0.1
    args = (8, "sigmoid", True, 8, 4, bias, 2.5, "top2sum")
    rows.append(_row("select_experts grouped sigmoid", "V3 E=256 k=8 8/4 groups", tokens,
                     lambda: moe_routing.select_experts(v3, *args), lambda: moe_routing_ref.select_experts(v3, *args),
                     tokens * 256 * 4 + tokens * 8 * 8, bw, repeats))
    ids = moe_routing.select_experts(logits, k)[1]
    bm = _tiles(tokens * k, e, False)[0]
    nbytes = tokens * k * 4 * 2 + e * 4
    rows.append(_row("align_by_expert", f"V2-Lite E={e} k={k} block_m={bm}", tokens,
                     lambda: moe_routing.align_by_expert(ids, e, bm),
                     lambda: moe_routing_ref.align_by_expert(ids, e, bm),
                     nbytes, bw, repeats))
    return rows


def prefill_rows(tokens, rate, repeats) -> list[dict]:
    import torch.nn.functional as F

    from engine.attention.metadata import AttentionMetadata
    from engine.kernels.paged_attention import prefill_attention
    hq, hkv, d, page = QWEN3_8B["hq"], QWEN3_8B["hkv"], QWEN3_8B["d"], 16
    dev, dt = DEVICE, torch.bfloat16
    q = torch.randn(tokens, hq, d, device=dev, dtype=dt)
    k, v = torch.randn(tokens, hkv, d, device=dev, dtype=dt), torch.randn(tokens, hkv, d, device=dev, dtype=dt)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    n_pages = tokens // page
    cache = torch.stack([k, v], 0).view(2, n_pages, page, hkv, d).transpose(0, 1).contiguous()
    meta = AttentionMetadata.build([tokens], [tokens], [list(range(n_pages))], page, dev)
    out = torch.empty_like(q)
    scale = d ** -0.5
    flops = 2 * 2 * hq * d * tokens * (tokens + 1) / 2  # causal QK^T and PV
    variants = {
        "SDPA enable_gqa": lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale,
                                                                  enable_gqa=True),
        "SDPA heads expanded": lambda: F.scaled_dot_product_attention(
            q4, k4.repeat_interleave(hq // hkv, 1), v4.repeat_interleave(hq // hkv, 1), is_causal=True, scale=scale),
        "Triton paged prefill": lambda: prefill_attention(q, cache, meta.block_tables, meta.seq_lens,
                                                          meta.query_start_loc, 0, 1, tokens, scale, 0, 1, d, 0, out),
    }
    rows = []
    for name, fn in variants.items():
        ms = time_ms(fn, repeats) if DEVICE == "cuda" else _cpu_ms(fn)
        rows.append({"variant": name, "tokens": tokens, "ms": ms, "floor_ms": flops / rate * 1e3,
                     "tflops": flops / ms / 1e9})
    return rows


def run(tokens_list, prefill_tokens, repeats) -> dict:
    p = probe() if DEVICE == "cuda" else {"device": "cpu (smoke)", "hbm_copy_bytes_per_s": 1e11,
                                          "bf16_matmul_flops_per_s": 1e12}
    bw, rate = p["hbm_copy_bytes_per_s"], p["bf16_matmul_flops_per_s"]
    rows = []
    for t in tokens_list:
        rows += norm_act_rows(t, bw, repeats) + [rope_kv_row(t, bw, repeats)] + moe_rows(t, bw, repeats)
    return {"device": p, "replays": REPLAYS, "rows": rows, "prefill": prefill_rows(prefill_tokens, rate, repeats)}


def markdown(r: dict) -> str:
    p = r["device"]
    lines = [f"Device: {p['device']}; HBM copy {p['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s (r+w), bf16 matmul "
             f"{p['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s (same run). GPU time per call from a CUDA graph of "
             f"{r['replays']} calls; floor = bytes read+written once / HBM copy rate.", "",
             "| op | shape | tokens | fused ms | torch ms | speedup | floor ms | % of floor |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        lines.append(f"| {x['op']} | {x['shape']} | {x['tokens']} | {x['fused_ms'] * 1e3:.1f} µs | "
                     f"{x['ref_ms'] * 1e3:.1f} µs | {x['speedup']:.1f}× | {x['floor_ms'] * 1e3:.2f} µs | "
                     f"{x['pct_of_floor']:.0f}% |")
    lines += ["", "Dense causal prefill attention, Qwen3-8B heads (32 q / 8 kv, D=128), one sequence, eager:", "",
              "| variant | tokens | ms | FLOPs floor ms | TFLOP/s |", "|---|---:|---:|---:|---:|"]
    for x in r["prefill"]:
        lines.append(f"| {x['variant']} | {x['tokens']} | {x['ms']:.3f} | {x['floor_ms']:.3f} | {x['tflops']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 2048])
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="run once on CPU (set TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
    result = run(args.tokens, args.prefill_tokens, args.repeats)
    emit(result, markdown(result), args.out, "kernels")


if __name__ == "__main__":
    main()
