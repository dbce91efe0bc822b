"""One MoE layer at real size, split into the engine's stages, each next to its floor.

Default shape: DeepSeek-V3 (hidden 7168, 256 routed experts of width 2048, top-8 of 8 groups with
4 kept, sigmoid scores + correction bias, one shared expert), bf16, random weights. For each batch
size (decode-sized 128 tokens, prefill-sized 4096) it times with CUDA events (median of repeats):

* routing: gate GEMM + grouped top-k (`engine.layers.moe.select_experts`);
* permutation: grouping token-expert slots by expert (`engine.kernels.fused_moe.align_by_expert`);
* grouped GEMM: the Triton fused-MoE call (`fused_experts`: gate/up GEMM, SiLU·up, down GEMM,
  weighted sum of the k slots) minus the permutation it includes;
* the shared expert (a dense gated MLP);
* baselines: a per-expert Python loop in torch (what a straightforward implementation does) and
  the engine's capture-safe torch fallback.

Floors: the expert weights the batch actually touches, read once, over the measured HBM copy
bandwidth; the routed FLOPs (2·T·k·3·H·I) over the measured bf16 matmul rate; the floor is the
larger of the two. `python -m bench.moe_layer_bench --out DIR` prints a Markdown table and writes
JSON.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.device_probe import probe, time_ms
from bench.record import emit


def per_expert_loop(hidden, w13, w2, weights, ids):
    """The straightforward torch implementation: one pair of GEMMs per touched expert."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    flat = ids.reshape(-1)
    token = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(ids.shape[1])
    w = weights.reshape(-1)
    for e in torch.unique(flat).tolist():
        sel = flat == e
        x = hidden[token[sel]]
        gate, up = F.linear(x, w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e]).float()
        out.index_add_(0, token[sel], y * w[sel, None])
    return out.to(hidden.dtype)


def run(tokens_list, hidden=7168, num_experts=256, inter=2048, top_k=8, groups=8, topk_groups=4, shared=1,
        repeats=20, seed=0) -> dict:
    from engine.kernels.fused_moe import _launch_config, align_by_expert, fused_experts
    from engine.layers.moe import fused_experts_torch, select_experts

    dev = torch.device("cuda")
    dev_probe = probe()
    bw, rate = dev_probe["hbm_copy_bytes_per_s"], dev_probe["bf16_matmul_flops_per_s"]
    gen = torch.Generator(device=dev).manual_seed(seed)
    dt = torch.bfloat16
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=dev, dtype=dt) * 0.02)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen, device=dev, dtype=dt) * 0.02)
    gate_w = torch.randn(num_experts, hidden, generator=gen, device=dev, dtype=dt) * 0.02
    bias = torch.randn(num_experts, generator=gen, device=dev) * 0.01
    sh_gate_up = torch.randn(2 * inter * shared, hidden, generator=gen, device=dev, dtype=dt) * 0.02
    sh_down = torch.randn(hidden, inter * shared, generator=gen, device=dev, dtype=dt) * 0.02
    expert_bytes = 3 * hidden * inter * w13.element_size()
    rows = []
    for t in tokens_list:
        x = torch.randn(t, hidden, generator=gen, device=dev, dtype=dt)

        def route():
            logits = F.linear(x.float(), gate_w.float())
            return select_experts(logits, top_k, "sigmoid", renormalize=True, num_groups=groups,
                                  topk_groups=topk_groups, correction_bias=bias, routed_scaling_factor=2.5,
                                  group_score="top2sum")

        weights, ids = route()
        touched = int(torch.unique(ids).numel())
        # Correctness at this size: the Triton path against the per-expert loop.
        got, want = fused_experts(x, w13, w2, weights, ids), per_expert_loop(x, w13, w2, weights, ids)
        rel = float((got.float() - want.float()).norm() / want.float().norm())
        block_m = _launch_config(t * top_k, num_experts, False)[0]  # the permutation fused_experts does
        t_route = time_ms(route, repeats)
        t_align = time_ms(lambda: align_by_expert(ids, num_experts, block_m), repeats)
        t_fused = time_ms(lambda: fused_experts(x, w13, w2, weights, ids), repeats)
        t_shared = time_ms(lambda: F.linear(F.silu(F.linear(x, sh_gate_up).chunk(2, -1)[0])
                                             * F.linear(x, sh_gate_up).chunk(2, -1)[1], sh_down), repeats)
        t_loop = time_ms(lambda: per_expert_loop(x, w13, w2, weights, ids), max(3, repeats // 4))
        t_torch = None
        if t * top_k <= num_experts or t <= 512:  # the fallback's dense path needs E·T·2I activations
            try:
                t_torch = time_ms(lambda: fused_experts_torch(x, w13, w2, weights, ids), max(3, repeats // 4))
            except torch.OutOfMemoryError:
                t_torch = None
        flops = 2 * t * top_k * 3 * hidden * inter
        floor_bytes_ms = touched * expert_bytes / bw * 1e3
        floor_flops_ms = flops / rate * 1e3
        floor_ms = max(floor_bytes_ms, floor_flops_ms)
        t_gemm = t_fused - t_align
        rows.append(dict(
            tokens=t, touched_experts=touched, expert_bytes_touched=touched * expert_bytes, routed_flops=flops,
            routing_ms=t_route, permutation_ms=t_align, grouped_gemm_ms=t_gemm, fused_total_ms=t_fused,
            shared_expert_ms=t_shared, per_expert_loop_ms=t_loop, torch_fallback_ms=t_torch,
            floor_bytes_ms=floor_bytes_ms, floor_flops_ms=floor_flops_ms, floor_ms=floor_ms,
            gemm_pct_of_floor=100 * floor_ms / t_gemm, fused_pct_of_floor=100 * floor_ms / t_fused,
            speedup_vs_loop=t_loop / t_fused, rel_err_vs_loop=rel))
    shape = dict(hidden=hidden, num_experts=num_experts, intermediate=inter, top_k=top_k, groups=groups,
                 topk_groups=topk_groups, shared_experts=shared, dtype="bfloat16")
    return {"device": dev_probe, "shape": shape, "rows": rows}


def markdown(result: dict) -> str:
    p = result["device"]
    lines = [f"Device: {p['device']}; HBM copy {p['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s (r+w), "
             f"bf16 matmul {p['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s (same run).", "",
             f"Shape: {result['shape']}", "",
             "| tokens | experts touched | routing ms | permutation ms | grouped GEMM ms | fused total ms | "
             "floor ms (bytes / FLOPs) | fused % of floor | shared expert ms | per-expert loop ms | "
             "torch fallback ms | × vs loop | rel. err vs loop |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        fb = f"{r['torch_fallback_ms']:.2f}" if r["torch_fallback_ms"] is not None else "—"
        lines.append(
            f"| {r['tokens']} | {r['touched_experts']} | {r['routing_ms']:.3f} | {r['permutation_ms']:.3f} | "
            f"{r['grouped_gemm_ms']:.3f} | {r['fused_total_ms']:.3f} | {r['floor_ms']:.3f} "
            f"({r['floor_bytes_ms']:.3f} / {r['floor_flops_ms']:.3f}) | {r['fused_pct_of_floor']:.0f}% | "
            f"{r['shared_expert_ms']:.3f} | {r['per_expert_loop_ms']:.2f} | {fb} | {r['speedup_vs_loop']:.1f}× | "
            f"{r['rel_err_vs_loop']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="128,4096", help="batch sizes in tokens, comma-separated")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="directory for moe_layer.md / moe_layer.json")
    args = ap.parse_args()
    result = run([int(t) for t in args.tokens.split(",")], repeats=args.repeats)
    emit(result, markdown(result), args.out, "moe_layer")

if __name__ == "__main__":
    main()
