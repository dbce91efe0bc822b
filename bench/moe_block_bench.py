"""DeepSeek-V2-Lite's MoE block after routing (64 routed experts of width 1408, top-6, two shared
experts as one 2816-wide MLP; bf16, random weights) at decode and prefill sizes: the engine's path
now (`fused_experts` with the shared experts' weights: two GEMV kernels up to
`moe_decode.MAX_TOKENS` tokens, else the grouped GEMM with the prefill tile) against the path before
it (grouped GEMM at the old tiles for every size, the shared MLP as three separate kernels), next to
the floor: the bytes of the touched experts plus the shared MLP over the measured HBM copy rate, or
the FLOPs over the measured matmul rate, whichever is larger. Eager calls timed with CUDA events
(at one token the host's launches are part of what is timed, for both paths).
`python -m bench.moe_block_bench [--tokens 1,4,16,64,2048] [--out DIR]`."""
from __future__ import annotations

import argparse
from unittest import mock

import torch
import torch.nn.functional as F

from bench.device_probe import probe, time_ms
from bench.record import emit


def run(tokens_list, hidden=2048, num_experts=64, inter=1408, top_k=6, shared=2, repeats=20) -> dict:
    from engine.kernels import fused_moe, moe_decode
    from engine.kernels.fused_moe_ref import fused_experts_ref
    from engine.kernels.norm_act import silu_and_mul
    from engine.layers.moe import select_experts

    dev, dt = torch.device("cuda"), torch.bfloat16
    p = probe("cuda")
    bw, rate = p["hbm_copy_bytes_per_s"], p["bf16_matmul_flops_per_s"]
    gen = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=dev, dtype=dt) * hidden ** -0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, device=dev, dtype=dt) * inter ** -0.5
    sw13 = torch.randn(2 * shared * inter, hidden, generator=gen, device=dev, dtype=dt) * hidden ** -0.5
    sw2 = torch.randn(hidden, shared * inter, generator=gen, device=dev, dtype=dt) * (shared * inter) ** -0.5
    gate = torch.randn(num_experts, hidden, generator=gen, device=dev) * 0.02
    old_config = lambda n, e, cpu: (*fused_moe._tiles(n, e, cpu), 4, 3)  # noqa: E731
    rows = []
    for t in tokens_list:
        x = torch.randn(t, hidden, generator=gen, device=dev, dtype=dt)
        wts, ids = select_experts(F.linear(x.float(), gate), top_k, "softmax")
        now = lambda: fused_moe.fused_experts(x, w13, w2, wts, ids, shared_weights=(sw13, sw2))  # noqa: E731

        def before():
            return fused_moe.fused_experts(x, w13, w2, wts, ids, F.linear(silu_and_mul(F.linear(x, sw13)), sw2))
        ref = fused_experts_ref(x, w13, w2, wts, ids, shared_weights=(sw13, sw2)).float()
        err = float((now().float() - ref).norm() / ref.norm())
        touched = int(torch.unique(ids).numel())
        nbytes = (touched * 3 * hidden * inter + 3 * hidden * shared * inter) * w13.element_size()
        flops = 2 * t * 3 * hidden * inter * (top_k + shared)
        floor = max(nbytes / bw, flops / rate) * 1e3
        t_now = time_ms(now, repeats)
        with mock.patch.object(moe_decode, "MAX_TOKENS", 0), mock.patch.object(fused_moe, "_launch_config",
                                                                              old_config):
            t_before = time_ms(before, repeats)
        rows.append(dict(tokens=t, touched_experts=touched, bytes=nbytes, flops=flops, floor_ms=floor,
                         now_ms=t_now, before_ms=t_before, now_pct_of_floor=100 * floor / t_now,
                         before_pct_of_floor=100 * floor / t_before, rel_err_vs_ref=err))
    return {"device": p, "shape": dict(hidden=hidden, experts=num_experts, inter=inter, top_k=top_k, shared=shared),
            "rows": rows}


def markdown(r: dict) -> str:
    p = r["device"]
    lines = [f"Device: {p['device']}; HBM copy {p['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
             f"{p['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s (same run). Shape: {r['shape']}", "",
             "| tokens | experts touched | floor ms | now ms (% of floor) | before ms (% of floor) | rel. err |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {x['tokens']} | {x['touched_experts']} | {x['floor_ms']:.4f} | {x['now_ms']:.4f} "
              f"({x['now_pct_of_floor']:.0f}%) | {x['before_ms']:.4f} ({x['before_pct_of_floor']:.0f}%) | "
              f"{x['rel_err_vs_ref']:.1e} |" for x in r["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,4,16,64,2048")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = run([int(t) for t in args.tokens.split(",")], repeats=args.repeats)
    emit(result, markdown(result), args.out, "moe_block")


if __name__ == "__main__":
    main()
