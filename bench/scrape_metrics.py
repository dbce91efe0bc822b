"""Where a served request's time went, from the cluster's own Prometheus histograms: scrape every
process of a `pdserve up` (its `--prometheus-targets` file) before and after a load run, then print, per
process and histogram, the mean over the requests of that run (the difference of `_sum` over the
difference of `_count`). Beside the client's TTFT this splits it into the router's TTFT, the prefill
node's queue and prefill times and the KV push; it is what the one-GPU sweeps need to say why a
simulated TTFT differs from the measured one. A few counters come along (engine steps, tokens,
preemptions): between two scrapes they give each node's mean tokens per step (a decode node's mean
batch) and wall time per step (its step time while it never idles), what a simulated TPOT is made of.

    python -m bench.scrape_metrics scrape --targets T.json --out before.json
    python -m bench.scrape_metrics diff before.json after.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request

# Histograms worth splitting a TTFT into (prefix `pdserve_` or not: matched on the suffix).
HISTOGRAMS = ("time_to_first_token_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
              "kv_transfer_time_seconds", "kv_transfer_exposed_seconds", "kv_destination_wait_seconds",
              "kv_write_tail_seconds", "kv_post_delay_seconds", "kv_write_lock_wait_seconds",
              "kv_write_call_seconds", "kv_writes_per_push",
              "request_time_per_output_token_seconds", "e2e_request_latency_seconds")
# Counters kept too (`parse(...)["counters"]`), for steps and tokens between two scrapes.
COUNTERS = ("engine_steps_total", "generation_tokens_total", "prompt_tokens_total", "num_preemptions_total")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse(text: str) -> dict:
    """`{histogram: [sum, count]}` over every label set of each histogram in HISTOGRAMS, and under
    `"counters"` `{counter: value}` summed the same way for those in COUNTERS."""
    out: dict = {}
    counters: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        name, value = m.group(1), m.group(3)
        for h in HISTOGRAMS:
            for suffix, i in (("_sum", 0), ("_count", 1)):
                if name.endswith(h + suffix):
                    out.setdefault(h, [0.0, 0.0])[i] += float(value)
        for c in COUNTERS:
            if name.endswith(c):
                counters[c] = counters.get(c, 0.0) + float(value)
    if counters:
        out["counters"] = counters
    return out


def scrape(targets_file: str, timeout_s: float = 5.0) -> dict:
    with open(targets_file) as f:
        groups = json.load(f)
    nodes = {}
    for g in groups:
        name = g.get("labels", {}).get("node", g["targets"][0])
        try:
            with urllib.request.urlopen(f"http://{g['targets'][0]}/metrics", timeout=timeout_s) as r:
                nodes[name] = parse(r.read().decode())
        except OSError as e:
            nodes[name] = {"error": str(e)}
    return {"time": time.time(), "nodes": nodes}


def diff(before: dict, after: dict) -> dict[str, dict[str, dict]]:
    """Per node and histogram: requests observed between the scrapes and their mean (in ms for the
    `_seconds` histograms, as `mean_ms`; else as `mean`)."""
    out: dict[str, dict[str, dict]] = {}
    for node, hists in after["nodes"].items():
        if "error" in hists:
            continue
        prev = before["nodes"].get(node, {})
        _counter_diff(out, node, prev.get("counters", {}), hists.get("counters", {}),
                      after.get("time", 0.0) - before.get("time", 0.0))
        for h, (s, c) in ((h, v) for h, v in hists.items() if h != "counters"):
            s0, c0 = prev.get(h, [0.0, 0.0]) if "error" not in prev else (0.0, 0.0)
            if c - c0 > 0:
                mean = (s - s0) / (c - c0)
                out.setdefault(node, {})[h] = ({"count": int(c - c0), "mean_ms": mean * 1e3} if h.endswith("_seconds")
                                               else {"count": int(c - c0), "mean": mean})
    return out


def _counter_diff(out: dict, node: str, prev: dict, now: dict, seconds: float) -> None:
    """The counters' increase between two scrapes `seconds` apart, and from the engine's steps: tokens
    per step (generated, and prompt tokens for a prefill node) and the wall time per step."""
    delta = {c: now[c] - prev.get(c, 0.0) for c in now if now[c] - prev.get(c, 0.0) > 0}
    for c, d in delta.items():
        out.setdefault(node, {})[c] = {"count": int(d), "mean": d}
    steps = delta.get("engine_steps_total", 0)
    if steps:
        for c, label in (("generation_tokens_total", "generated_tokens_per_step"),
                         ("prompt_tokens_total", "prompt_tokens_per_step")):
            if c in delta:
                out[node][label] = {"count": int(steps), "mean": delta[c] / steps}
        if seconds > 0:
            out[node]["wall_seconds_per_step"] = {"count": int(steps), "mean_ms": seconds / steps * 1e3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scrape")
    s.add_argument("--targets", required=True)
    s.add_argument("--out", required=True)
    d = sub.add_parser("diff")
    d.add_argument("before")
    d.add_argument("after")
    args = ap.parse_args(argv)
    if args.cmd == "scrape":
        with open(args.out, "w") as f:
            json.dump(scrape(args.targets), f)
        return 0
    with open(args.before) as f1, open(args.after) as f2:
        result = diff(json.load(f1), json.load(f2))
    for node, hists in sorted(result.items()):
        for h, v in sorted(hists.items()):
            mean = f"{v['mean_ms']:9.2f} ms" if "mean_ms" in v else f"{v['mean']:9.2f}"
            print(f"{node:10s} {h:42s} n={v['count']:4d} mean {mean}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
