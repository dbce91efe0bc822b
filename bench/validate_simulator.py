"""Re-predict recorded `pdserve bench` runs with the planner's simulator from a profile measured
separately (nothing fitted to the runs), and print predicted against measured p50 TTFT, p50 TPOT
and goodput with the relative error.

    python -m bench.validate_simulator --profile PROFILE.json bench/results/2026-11-24_h100_sweep.json \\
        bench/results/2026-11-25_h100x2_colloc/*.json [--out DIR]

Each result file is one `pdserve bench --save-result` JSON, or a dict of them by file name (the
sweep files). The cluster each run was served by is read from its file name (the recorded
scripts' shapes, `RUNS` below) unless flags give it; the requests are rebuilt with the bench's own
generator and arrival process from the run's dataset, prompt count and seed (recorded since
2026-12-07; 0 before); only runs of the profile's model are compared.

Runs against one server that repeated a seed measured prefills the server's prefix cache already
held from the run before (the recorded sweeps before 2026-12-07: every rate after a dataset's first
sent the same prompts), which the simulator, starting empty, does not predict: re-measure those.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from types import SimpleNamespace

from bench.record import emit
from planner.datasets import build
from planner.profile import Profile
from planner.simulator import ClusterSpec, simulate
from planner.workload import from_samples

# Cluster shapes of the recorded scripts, by result-file prefix (bench/run_sweep_gpu.sh,
# bench/run_colloc_gpu2.sh): router + nodes through `pdserve up`, max_num_seqs 128, max_model_len
# 6144, chunk budget 8192 (the default).
RUNS = {
    "sweep_": dict(num_prefill=1, num_decode=1, share_gpu=True, gpu_memory_utilization=0.45, kv="measured"),
    # COLLOC=1 of bench/run_planner_validation_gpu.sh: one collocated node with the GPU to itself
    "sweepc_": dict(num_prefill=0, num_decode=1, gpu_memory_utilization=0.85, kv="nvlink"),
    "colloc_disagg_": dict(num_prefill=1, num_decode=1, gpu_memory_utilization=0.85, kv="nvlink"),
    "colloc_colloc_": dict(num_prefill=0, num_decode=2, gpu_memory_utilization=0.85, kv="nvlink"),
}


def served_steps(path: str) -> dict | None:
    """A run's engine steps as the cluster counted them, from the scrapes the validation script takes
    around it (`metrics_{before,after}_<run>.json` beside `<run>.json`, bench/scrape_metrics.py): per role
    (node names `decode*` / `prefill*`), tokens per step (a decode node's mean batch) and wall ms per
    step (its step time where it never idled). None without the scrapes."""
    from bench.scrape_metrics import diff
    folder, stem = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
    files = [os.path.join(folder, f"metrics_{when}_{stem}.json") for when in ("before", "after")]
    if not all(os.path.exists(f) for f in files):
        return None
    with open(files[0]) as f0, open(files[1]) as f1:
        per_node = diff(json.load(f0), json.load(f1))
    out = {}
    for node, hists in per_node.items():
        role = next((r for r in ("decode", "prefill", "collocated") if node.startswith(r)), None)
        if role and "engine_steps_total" in hists:
            out[role] = {"steps": hists["engine_steps_total"]["count"],
                         "tokens_per_step": hists.get("generated_tokens_per_step", {}).get("mean"),
                         "wall_ms_per_step": hists.get("wall_seconds_per_step", {}).get("mean_ms")}
    return out or None


def load_results(paths: list[str]) -> list[tuple[str, dict]]:
    out = []
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        if "median_ttft_ms" in d:
            steps = served_steps(path)
            if steps:
                d["served_steps"] = steps
            out.append((os.path.basename(path), d))
        else:
            out += [(name, r) for name, r in d.items() if isinstance(r, dict) and "median_ttft_ms" in r]
    return out


def shape_for(name: str, args) -> ClusterSpec | None:
    run = next((v for k, v in RUNS.items() if name.startswith(k)), None)
    if args.num_decode is not None:
        run = dict(num_prefill=args.num_prefill, num_decode=args.num_decode, share_gpu=args.share_gpu,
                   gpu_memory_utilization=args.gpu_memory_utilization, kv=args.kv_link or "nvlink")
    if run is None:
        return None
    run = dict(run)
    kv = args.kv_link or run.pop("kv")
    run.pop("kv", None)
    if args.gpu_memory_utilization:
        run["gpu_memory_utilization"] = args.gpu_memory_utilization
    over = None if args.request_overhead_ms is None else args.request_overhead_ms / 1e3
    return ClusterSpec(**run, request_overhead_s=over, shared_gpu_model=args.shared_gpu, first_token=args.first_token,
                       max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                       chunk_budget=args.chunk_budget, kv_link="nvlink" if kv == "measured" else kv,
                       use_measured_kv=kv == "measured")


def requests_for(rep: dict, args):
    n = rep.get("num_prompts") or rep["completed"] + rep["failed"]
    per = rep["total_input_tokens"] // max(rep["completed"], 1)
    out = rep["total_output_tokens"] // max(rep["completed"], 1)
    seed = rep.get("seed", args.seed)  # recorded since 2026-12-07; runs before it used seed 0
    ns = SimpleNamespace(random_input_len=args.input_len or rep.get("random_input_len") or per,
                         random_output_len=args.output_len or rep.get("random_output_len") or out,
                         random_range_ratio=0.0, seed=seed)
    samples = build(rep["dataset"], n, args.vocab_size, ns)
    return from_samples(samples, rep["request_rate"], rep.get("burstiness", 1.0), seed)


def http_overhead_s(profile: Profile, path: str) -> float:
    """Idle HTTP run's median TTFT minus the profile's prefill of its prompt length (seconds, ≥ 0)."""
    with open(path) as f:
        rep = json.load(f)
    prompt = rep["total_input_tokens"] // max(rep["completed"], 1)
    return max(0.0, rep["median_ttft_ms"] / 1e3 - profile.prefill_time(prompt))


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas else float("nan")


def validate(profile: Profile, results: list[tuple[str, dict]], args) -> list[dict]:
    rows = []
    for name, rep in results:
        if rep.get("model") != profile.model:
            continue
        spec = shape_for(name, args)
        if spec is None:
            print(f"skipping {name}: unknown cluster shape (give --num-prefill/--num-decode)", file=sys.stderr)
            continue
        if getattr(args, "overhead_single", False) and spec.request_overhead_s is None:
            spec = dataclasses.replace(spec, request_overhead_s=profile.serving_overhead.get(spec.serving_mode, 0.0))
        slos = {k: v / 1e3 for k, v in rep.get("slos_ms", {}).items()}
        pred = simulate(profile, spec, requests_for(rep, args)).summary(slos)
        row = {"run": name, "shape": spec.describe() + (" (one GPU)" if spec.share_gpu else ""),
               "rate": rep["request_rate"], "dataset": rep["dataset"]}
        for key in ("median_ttft_ms", "median_tpot_ms", "goodput", "request_throughput"):
            m, p = rep.get(key, float("nan")), pred.get(key, float("nan"))
            row[key] = {"measured": m, "predicted": p, "error": _err(p, m)}
        role = "collocated" if spec.collocated else "decode"  # the served node is `decode*` either way
        if rep.get("served_steps", {}).get("decode") and role in pred.get("steps", {}):
            row["decode_steps"] = {"measured": rep["served_steps"]["decode"], "predicted": pred["steps"][role]}
        rows.append(row)
    return rows


def markdown(res: dict) -> str:
    p = res["profile"]
    by_prompt = p.get("serving_overhead_by_prompt") or {}
    over = ", ".join(f"{k} {v * 1e3:.0f} ms" + (" (" + ", ".join(f"{n} tokens {s * 1e3:.0f} ms" for n, s in by_prompt[k])
                                                + ")" if by_prompt.get(k) else "")
                     for k, v in p["serving_overhead"].items()) or "none measured"
    if res.get("request_overhead_ms") is not None:
        over += f" (used instead: {res['request_overhead_ms']:.0f} ms)"
    inter = p.get("interference") or {}
    shared = (f"shared GPU: measured slowdown decode ×{inter['decode_slowdown']:.2f}, prefill "
              f"×{inter['prefill_slowdown']:.2f}" if inter else "shared GPU: no interference measured")
    lines = [f"Profile: {p['model']} ({p['dtype']}) on {p['device']}, commit {p['commit']}, {p['date']}; "
             f"serving-path overhead: {over}; {shared}; shared-GPU model: {res.get('shared_gpu', 'auto')}; "
             f"first token to the client: {res.get('first_token', 'kv_landed')}", "",
             "| run | shape | rate | p50 TTFT ms meas / pred (err) | p50 TPOT ms meas / pred (err) | "
             "goodput req/s meas / pred (err) |", "|---|---|---:|---|---|---|"]

    def cell(d, f):
        return f"{d['measured']:{f}} / {d['predicted']:{f}} ({d['error']:+.0%})"
    for r in res["rows"]:
        lines.append(f"| {r['run']} | {r['shape']} | {r['rate']:g} | {cell(r['median_ttft_ms'], '.0f')} | "
                     f"{cell(r['median_tpot_ms'], '.1f')} | {cell(r['goodput'], '.2f')} |")
    errs = [abs(r[k]["error"]) for r in res["rows"] for k in ("median_ttft_ms", "median_tpot_ms", "goodput")]
    if errs:
        lines += ["", f"Largest |error|: {max(errs):.0%}; within 15%: {sum(e <= 0.15 for e in errs)} of {len(errs)}."]
    stepped = [r for r in res["rows"] if "decode_steps" in r]
    if stepped:  # what a TPOT is made of: the decode engine's batch and step, served against simulated
        lines += ["", "Decode engine over each run (served: the cluster's counters between two scrapes, wall time "
                  "per step; simulated: mean step time):", "",
                  "| run | steps meas / sim | tokens per step meas / sim | ms per step meas (wall) / sim |",
                  "|---|---|---|---|"]
        def num(v, f):
            return "–" if v is None else f"{v:{f}}"
        for r in stepped:
            m, p = r["decode_steps"]["measured"], r["decode_steps"]["predicted"]
            lines.append(f"| {r['run']} | {m['steps']} / {p['steps']} | {num(m['tokens_per_step'], '.1f')} / "
                         f"{p['tokens_per_step']:.1f} | {num(m['wall_ms_per_step'], '.2f')} / {p['ms_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="recorded `pdserve bench` result JSON files")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--num-prefill", type=int, default=1, help="with --num-decode: the shape of every run")
    ap.add_argument("--num-decode", type=int, default=None)
    ap.add_argument("--share-gpu", action="store_true", help="prefill and decode node on one GPU")
    ap.add_argument("--shared-gpu", choices=["auto", "turns", "interference"], default="auto",
                    help="how P and D split a shared GPU: whole steps in turns, or at once stretched by the "
                         "profile's measured interference (auto: interference when the profile has it)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--kv-link", default=None, help="nvlink | pcie | rdma | NAME:GBPS:US | measured (the profile's)")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=6144)
    ap.add_argument("--chunk-budget", type=int, default=8192)
    ap.add_argument("--input-len", type=int, default=None, help="random dataset (default: from the run's totals)")
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-overhead-ms", type=float, default=None,
                    help="serving-path latency before a request reaches the nodes (default: the profile's)")
    ap.add_argument("--http-probe", default=None,
                    help="an idle `pdserve bench` run through the HTTP API (one request at a time, the device "
                         "script's probe_http_*.json): its median TTFT minus the profiled prefill is the overhead "
                         "(the sweep goes through HTTP; the profile's overhead was probed over gRPC)")
    ap.add_argument("--overhead-single", action="store_true",
                    help="the profile's one serving-overhead figure for every request, not its per-prompt-length "
                         "figures (to compare the two)")
    ap.add_argument("--first-token", choices=["sampled", "kv_landed"], default="sampled",
                    help="when the served first token left: when the prefill node sampled it (the product since "
                         "2026-12-07's first-token-ahead change), or after the KV push (runs recorded before it)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    profile = Profile.load(args.profile)
    if args.http_probe and args.request_overhead_ms is None:
        args.request_overhead_ms = http_overhead_s(profile, args.http_probe) * 1e3
        print(f"serving-path overhead from {args.http_probe} (HTTP, idle): {args.request_overhead_ms:.1f} ms",
              file=sys.stderr)
    rows = validate(profile, load_results(args.results), args)
    res = {"profile": {k: getattr(profile, k) for k in ("model", "dtype", "device", "commit", "date", "serving_overhead",
                                                        "serving_overhead_by_prompt", "interference")},
           "rows": rows, "shared_gpu": args.shared_gpu, "request_overhead_ms": args.request_overhead_ms,
           "first_token": args.first_token,
           "command": " ".join(sys.argv)}
    emit(res, markdown(res), args.out, f"validate_{profile.model}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
