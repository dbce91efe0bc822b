"""PNG plots of serving runs: latency CDFs (TTFT, TPOT, E2E) of one run, and throughput and goodput
against request rate for a sweep. Needs matplotlib (an optional dependency: `pip install matplotlib`).

    python -m bench.serving.plots RESULT.json [RESULT.json ...] --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def latency_cdfs(result: dict, path: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("ttfts", "tpots", "e2els"), ("TTFT", "TPOT", "E2E latency")):
        values = sorted(v * 1e3 for v in result.get("per_request", {}).get(key, []))
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        slo = (result.get("slos_ms") or {}).get(key[:-1])
        if slo:
            ax.axvline(slo, linestyle="--", color="gray", label=f"SLO {slo:g} ms")
            ax.legend()
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result.get('model', '')} {result.get('dataset', '')} @ {result.get('request_rate')} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep(results: list[dict], path: str) -> str:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r.get("model", ""), r.get("dataset", "")), []).append(r)
    for (model, dataset), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["request_rate"])
        rates = [r["request_rate"] for r in rs]
        a.plot(rates, [r["output_throughput"] for r in rs], marker="o", label=f"{model} {dataset}")
        b.plot(rates, [r.get("goodput", 0.0) for r in rs], marker="o", label=f"{model} {dataset}")
        b.plot(rates, [r["request_throughput"] for r in rs], linestyle=":", color="gray")
    a.set(xlabel="offered request rate (req/s)", ylabel="output tokens/s", title="throughput")
    b.set(xlabel="offered request rate (req/s)", ylabel="req/s", title="goodput (dotted: all completed)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="JSON files written by `pdserve bench --save-result`")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = [json.load(open(p)) for p in args.results]
    for p, r in zip(args.results, results):
        print(latency_cdfs(r, os.path.join(args.out, os.path.basename(p).removesuffix(".json") + "_cdf.png")))
    if len(results) > 1:
        print(sweep(results, os.path.join(args.out, "sweep.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
