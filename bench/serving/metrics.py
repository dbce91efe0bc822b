"""The report of a serving run, with the field names of `vllm bench serve`, and goodput
(DistServe's definition: completed requests per second that meet every SLO)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestResult:
    success: bool
    prompt_len: int
    output_len: int = 0  # tokens received
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # gaps between streamed tokens (s)
    latency: float = 0.0  # end to end (s)
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / (self.output_len - 1) if self.output_len > 1 else 0.0


def parse_goodput(spec: list[str] | None) -> dict[str, float]:
    """`["ttft:1000", "tpot:50"]` (milliseconds) → {"ttft": 1.0, "tpot": 0.05} seconds."""
    slos = {}
    for item in spec or []:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"bad --goodput item {item!r}; expected ttft:MS, tpot:MS or e2el:MS")
        slos[key] = float(value) / 1e3
    return slos


def _stats(name: str, values_s: list[float], percentiles=(90, 99)) -> dict:
    a = np.asarray(values_s, dtype=float) * 1e3 if values_s else np.zeros(1)
    out = {f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
           f"std_{name}_ms": float(a.std())}
    for p in percentiles:
        out[f"p{p}_{name}_ms"] = float(np.percentile(a, p))
    return out


def report(results: list[RequestResult], duration_s: float, slos: dict[str, float] | None = None) -> dict:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    rep = {"duration": duration_s, "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
           "request_throughput": len(ok) / duration_s, "output_throughput": out_tokens / duration_s,
           "total_token_throughput": (in_tokens + out_tokens) / duration_s,
           "errors": sorted({r.error for r in results if r.error})[:10]}
    rep.update(_stats("ttft", [r.ttft for r in ok]))
    rep.update(_stats("tpot", [r.tpot for r in ok if r.output_len > 1]))
    rep.update(_stats("itl", [g for r in ok for g in r.itl]))
    rep.update(_stats("e2el", [r.latency for r in ok]))
    if slos:
        good = [r for r in ok if r.ttft <= slos.get("ttft", float("inf")) and r.tpot <= slos.get("tpot", float("inf"))
                and r.latency <= slos.get("e2el", float("inf"))]
        rep["goodput"] = len(good) / duration_s
        rep["slo_attainment"] = len(good) / len(results) if results else 0.0
        rep["slos_ms"] = {k: v * 1e3 for k, v in slos.items()}
    return rep


def format_report(rep: dict) -> str:
    lines = ["============ Serving Benchmark Result ============",
             f"{'Successful requests:':<40}{rep['completed']:<10}",
             f"{'Failed requests:':<40}{rep['failed']:<10}",
             f"{'Benchmark duration (s):':<40}{rep['duration']:<10.2f}",
             f"{'Total input tokens:':<40}{rep['total_input_tokens']:<10}",
             f"{'Total generated tokens:':<40}{rep['total_output_tokens']:<10}",
             f"{'Request throughput (req/s):':<40}{rep['request_throughput']:<10.2f}",
             f"{'Output token throughput (tok/s):':<40}{rep['output_throughput']:<10.2f}",
             f"{'Total Token throughput (tok/s):':<40}{rep['total_token_throughput']:<10.2f}"]
    if "goodput" in rep:
        lines.append(f"{'Request goodput (req/s):':<40}{rep['goodput']:<10.2f}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{'-' * 15}{title}{'-' * 15}")
        for stat in ("mean", "median", "p90", "p99"):
            lines.append(f"{f'{stat.capitalize()} {name.upper()} (ms):':<40}{rep[f'{stat}_{name}_ms']:<10.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)
