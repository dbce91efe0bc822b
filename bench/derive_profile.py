"""Planner profiles derived from separate engine measurements, for devices or models this project
cannot profile with `pdserve profile` (no H100 here any more; DeepSeek-V3 needs 8+ GPUs per role).
Two derivations, both from `bench/engine_bench.py` JSON (decode step at batch 1/16/64, 2k prefill)
plus the roofline's byte and FLOP counts (`bench/roofline.py`); nothing is fitted to serving runs.

* `anchored` (same model, another device): decode(b, ctx) = the measured step at batch b (log-log
  between the measured batches) + the extra KV bytes of ctx beyond the measured context read at the
  device's measured HBM rate; prefill(t, c) = the measured 2k prefill scaled by FLOPs (2·active
  params·t + causal attention over c + t), never below the batch-1 decode step (weights are read
  once).
* `referenced` (another model of the same family on the same device): every step costs a fixed
  time per layer (launches, host) plus its roofline bytes (decode) or FLOPs (prefill) at an
  efficiency, both fitted to the reference model's measured steps on that device; the target's
  bytes per EP rank count the dense weights plus the experts its group's tokens touch (uniform
  routing) and its KV.

    python -m bench.derive_profile anchored --model qwen3-8b --engine-bench H100.json --out P.json
    python -m bench.derive_profile referenced --model deepseek-v3 --quantization fp8 --ep-size 8 \\
        --reference bench/results/2026-11-29_h200_issue16b/deepseek-v2-lite.json --out P.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys

import numpy as np

from bench.roofline import attention_flops, experts_touched, param_counts
from engine.config import ParallelConfig
from engine.memory_plan import H200_BYTES, plan as memory_plan
from engine.presets import resolve_model
from planner.profile import Profile

PREFILL_TOKENS = [16, 128, 512, 2048, 8192]
CACHED = [0, 2048, 8192]
BATCH = [1, 4, 16, 64, 128, 256]
CONTEXT = [128, 1024, 4096, 8192]


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _kv_bpt(mc, kv_bytes: int = 2) -> int:
    return mc.kv_spec(16, mc.dtype).bytes_per_token * kv_bytes // 2


def _prefill_flops(mc, tokens: int, cached: int) -> float:
    return 2.0 * param_counts(mc).active_per_token * tokens + attention_flops(mc, tokens, cached)


def _loglog(xs, ys, x):
    lx, ly = np.log(xs), np.log(ys)
    if x <= xs[0]:
        i = 0
    elif x >= xs[-1]:
        i = len(xs) - 2
    else:
        i = int(np.searchsorted(xs, x)) - 1
    t = (math.log(x) - lx[i]) / (lx[i + 1] - lx[i])
    return float(math.exp(ly[i] + t * (ly[i + 1] - ly[i])))


def _facts(mc, ep: int, quantization: str | None, gpu_bytes: int, util: float, kv_bpt: int) -> dict:
    pc = param_counts(mc)
    mp = memory_plan(mc, ParallelConfig(ep_size=ep), quantization, gpu_bytes, util)
    per_param = 1 if quantization == "fp8" else 2
    return {"kv_bytes_per_token": kv_bpt, "num_layers": mc.num_layers,
            "kv_capacity_tokens": max(16, mp.kv_budget_bytes // kv_bpt), "num_moe_layers": pc.moe_layers,
            "hidden_size": mc.hidden_size, "top_k": pc.top_k, "weight_bytes": mp.weight_bytes,
            "expert_weight_bytes": pc.per_expert * pc.moe_layers * pc.num_experts // ep * per_param,
            "gpu_memory_bytes": gpu_bytes, "gpu_memory_utilization": util, "ep_size": ep}


def anchored(model: str, bench: dict, kv_transfer: dict | None = None, serving_overhead: dict | None = None,
             gpu_bytes: int = 80 * 2**30, util: float = 0.9) -> Profile:
    mc = resolve_model(model, "bfloat16")
    rows = sorted(bench["decode"], key=lambda r: r["batch"])
    bs, ts = [r["batch"] for r in rows], [r["ms_per_step"] / 1e3 for r in rows]
    ctx0 = rows[0]["context"]
    hbm = bench["probe"]["hbm_copy_bytes_per_s"]
    kv_bpt = _kv_bpt(mc)

    def decode(b, ctx):
        return _loglog(bs, ts, b) + b * max(ctx - ctx0, 0) * kv_bpt / hbm

    p0, f0 = bench["prefill"]["seconds"], _prefill_flops(mc, bench["prefill"]["tokens"], 0)

    def prefill(t, c):
        return max(p0 * _prefill_flops(mc, t, c) / f0, decode(1, ctx0))  # weights are read at least once

    facts = _facts(mc, 1, None, gpu_bytes, util, kv_bpt)
    return _profile(model, "bfloat16", bench["device"], bench, prefill, decode, facts, kv_transfer, serving_overhead,
                    {"derivation": "anchored", "anchor_decode_ms": dict(zip(bs, [t * 1e3 for t in ts])),
                     "anchor_context": ctx0, "anchor_prefill_2k_ms": p0 * 1e3, "hbm_bytes_per_s": hbm})


def fit_reference(ref: dict) -> dict:
    """Per-layer fixed time and bandwidth / compute efficiencies of the reference model's steps:
    decode t = L·a + floor/eta_bw (least squares over the measured batches), prefill
    t = L·a + floor/eta_flops."""
    mc = resolve_model(ref["model"], "bfloat16")
    x = np.array([r["floor_ms_per_step"] for r in ref["decode"]]) / 1e3
    y = np.array([r["ms_per_step"] for r in ref["decode"]]) / 1e3
    slope, fixed = np.polyfit(x, y, 1)
    pre = ref["prefill"]
    eta_flops = pre["floor_s"] / (pre["seconds"] - fixed)
    return {"reference": ref["model"], "device": ref["device"], "per_layer_s": fixed / mc.num_layers,
            "eta_bandwidth": 1.0 / slope, "eta_flops": eta_flops, "hbm_bytes_per_s": ref["probe"]["hbm_copy_bytes_per_s"],
            "matmul_flops_per_s": ref["probe"]["bf16_matmul_flops_per_s"],
            "residuals_ms": [float(v) for v in (y - (fixed + slope * x)) * 1e3]}


def referenced(model: str, ref: dict, ep: int = 1, quantization: str | None = None, kv_bytes: int = 2,
               gpu_bytes: int = H200_BYTES, util: float = 0.9, fp8_time: bool = False,
               serving_overhead: dict | None = None, rates: dict | None = None) -> Profile:
    """`fp8_time`: FP8 weights also halve the bytes a step reads (off: time as bf16, which is what
    the engine's FP8 path measured on the H200 on 2026-11-29, 2026-11-29_h200_fp8.md; an FP8 reference
    measures the FP8 path's own efficiency). `rates`: another engine_bench JSON whose measured HBM copy
    rate and bf16 matmul rate replace the reference's (a reference measured on another device kind than
    the plan's: the fitted per-layer time and efficiencies are kept, the roofline rates are the target's)."""
    mc = resolve_model(model, "bfloat16")
    fit = fit_reference(ref)
    pc = param_counts(mc)
    if rates is not None:
        fit = dict(fit, hbm_bytes_per_s=rates["probe"]["hbm_copy_bytes_per_s"],
                   matmul_flops_per_s=rates["probe"]["bf16_matmul_flops_per_s"], rates_device=rates["device"])
    hbm, flops = fit["hbm_bytes_per_s"], fit["matmul_flops_per_s"]
    fixed = fit["per_layer_s"] * mc.num_layers
    kv_bpt = _kv_bpt(mc, kv_bytes)
    wb = 1 if (quantization == "fp8" and fp8_time) else 2

    def weight_bytes(tokens_per_rank):
        touched = experts_touched(pc.num_experts, pc.top_k, ep * tokens_per_rank) / ep if pc.num_experts else 0
        return (pc.dense + pc.per_expert * pc.moe_layers * touched) * wb

    def decode(b, ctx):
        return fixed + (weight_bytes(b) + b * ctx * kv_bpt) / (hbm * fit["eta_bandwidth"])

    def prefill(t, c):
        compute = _prefill_flops(mc, t, c) / (flops * fit["eta_flops"])
        return fixed + max(compute, weight_bytes(t) / (hbm * fit["eta_bandwidth"]))

    facts = _facts(mc, ep, quantization, gpu_bytes, util, kv_bpt)
    dtype = "bfloat16" + ("+fp8" if quantization == "fp8" else "")
    device = ref["device"] if rates is None else f"{rates['device']} (rates; fit on {ref['device']})"
    return _profile(model, dtype, device, ref, prefill, decode, facts, None, serving_overhead,
                    {"derivation": "referenced", "fit": fit, "fp8_time": fp8_time, "kv_cache_bytes": kv_bytes,
                     "ep_size": ep, "routing": "uniform"})


def _profile(model, dtype, device, src, prefill, decode, facts, kv_transfer, serving_overhead, notes) -> Profile:
    notes = dict(notes, source=src.get("command", ""), source_date=src.get("date", ""))
    return Profile(model=model, dtype=dtype, device=f"{device} (derived)", commit="derived",
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   prefill={"tokens": PREFILL_TOKENS, "cached": CACHED,
                            "seconds": [[prefill(t, c) for t in PREFILL_TOKENS] for c in CACHED]},
                   decode={"batch": BATCH, "context": CONTEXT,
                           "seconds": [[decode(b, x) for b in BATCH] for x in CONTEXT]},
                   kv_transfer=kv_transfer, serving_overhead=dict(serving_overhead or {}), notes=notes, **facts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="how", required=True)
    a = sub.add_parser("anchored")
    a.add_argument("--engine-bench", required=True)
    a.add_argument("--gpu-gib", type=float, default=80.0)
    r = sub.add_parser("referenced")
    r.add_argument("--reference", required=True, help="engine_bench JSON of a model of the same family")
    r.add_argument("--ep-size", type=int, default=1)
    r.add_argument("--quantization", choices=["fp8"], default=None)
    r.add_argument("--kv-bytes", type=int, default=2, help="bytes per KV element (1: fp8 KV cache)")
    r.add_argument("--fp8-time", action="store_true", help="FP8 weights also halve the bytes a step reads")
    r.add_argument("--rates-from", default=None,
                   help="engine_bench JSON measured on the plan's device kind: its HBM and matmul rates replace "
                        "the reference's (per-layer time and efficiencies stay the reference's)")
    for p in (a, r):
        p.add_argument("--model", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--serving-overhead-ms", default=None, help="MODE:MS[,MODE:MS] (measured elsewhere)")
    args = ap.parse_args(argv)
    over = {}
    for item in (args.serving_overhead_ms or "").split(","):
        if item:
            k, v = item.split(":")
            over[k] = float(v) / 1e3
    if args.how == "anchored":
        prof = anchored(args.model, _load(args.engine_bench), serving_overhead=over, gpu_bytes=int(args.gpu_gib * 2**30))
    else:
        prof = referenced(args.model, _load(args.reference), args.ep_size, args.quantization, args.kv_bytes,
                          fp8_time=args.fp8_time, serving_overhead=over,
                          rates=_load(args.rates_from) if args.rates_from else None)
    prof.save(args.out)
    print(f"wrote {args.out}: {prof.model} {prof.dtype} on {prof.device}; prefill 2k "
          f"{prof.prefill_time(2048) * 1e3:.1f} ms, decode b1/b64 at 1k {prof.decode_time(1, 1024) * 1e3:.1f} / "
          f"{prof.decode_time(64, 1024) * 1e3:.1f} ms, KV {prof.kv_capacity_tokens} tokens per GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
