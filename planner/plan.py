"""`pdserve plan`: which cluster shape serves a workload best under an SLO, from a profile.

For every shape of `--gpus` GPUs — P prefill and D decode nodes with an EP size per role, or
collocated nodes — and every chunk budget, it finds by bisection the highest request rate at
which at least `--attainment` of the requests meet both SLOs (DistServe's goodput), simulating
the same request list at each rate. It prints the best shapes by goodput per GPU with their
TTFT/TPOT percentiles at that rate and what breaks first just above it (the bottleneck).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace

from planner.link import parse_link
from planner.profile import Profile
from planner.simulator import ClusterSpec, simulate
from planner.workload import SimRequest, arrival_times


def parse_slo(text: str) -> dict[str, float]:
    """`"ttft:1000 tpot:50"` (ms) → {"ttft": 1.0, "tpot": 0.05} (s)."""
    slos = {}
    for item in text.replace(",", " ").split():
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot") or not value:
            raise ValueError(f"bad --slo item {item!r}; expected ttft:MS and/or tpot:MS")
        slos[key] = float(value) / 1e3
    if not slos:
        raise ValueError("--slo needs at least one of ttft:MS, tpot:MS")
    return slos


def shapes(gpus: int, ep_sizes: list[int], chunk_budgets: list[int], collocated: bool = True,
           base: ClusterSpec | None = None) -> list[ClusterSpec]:
    """Every cluster of exactly `gpus` GPUs: P·ep_p + D·ep_d = gpus (P, D ≥ 1), or D·ep = gpus collocated."""
    base = base or ClusterSpec()
    out = []
    for chunk in chunk_budgets:
        for pe in ep_sizes:
            for de in ep_sizes:
                for p in range(1, gpus // pe + 1):
                    rest = gpus - p * pe
                    if rest >= de and rest % de == 0:
                        out.append(replace(base, num_prefill=p, num_decode=rest // de, prefill_ep=pe,
                                           decode_ep=de, chunk_budget=chunk))
            if collocated and gpus % pe == 0:
                out.append(replace(base, num_prefill=0, num_decode=gpus // pe, prefill_ep=1, decode_ep=pe,
                                   chunk_budget=chunk))
    return out


@dataclass
class Evaluation:
    spec: ClusterSpec
    goodput_rate: float = 0.0  # highest rate (req/s) meeting the attainment target
    at_goodput: dict = field(default_factory=dict)  # summary at that rate
    above: dict = field(default_factory=dict)  # summary at the first rate that misses
    curve: list = field(default_factory=list)  # (offered rate, goodput req/s) of every rate tried

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput_rate / self.spec.num_gpus

    def bottleneck(self, slos: dict) -> str:
        s = self.above or self.at_goodput
        if not s:
            return "-"
        if s.get("failed"):
            return f"KV pages full on decode ({s['failed']} refused)"
        busy = s.get("busy", {})
        role, frac = max(busy.items(), key=lambda kv: kv[1]) if busy else ("-", 0.0)
        ttft_miss = s.get("p90_ttft_ms", 0) > slos.get("ttft", math.inf) * 1e3
        tpot_miss = s.get("p90_tpot_ms", 0) > slos.get("tpot", math.inf) * 1e3
        what = "TTFT" if ttft_miss and not tpot_miss else "TPOT" if tpot_miss and not ttft_miss else "TTFT+TPOT"
        if s.get("mean_kv_exposed_ms", 0) > 0.2 * s.get("median_ttft_ms", math.inf):
            return f"{what}: KV link (transfer adds {s['mean_kv_exposed_ms']:.0f} ms)"
        if what == "TPOT" and "decode" in busy:
            role, frac = "decode", busy["decode"]
        if what == "TTFT" and "prefill" in busy:
            role, frac = "prefill", busy["prefill"]
        return f"{what}: {role} GPUs {frac:.0%} busy"


def _requests(samples, rate: float, burstiness: float, seed: int) -> list[SimRequest]:
    times = arrival_times(len(samples), rate, burstiness, seed)
    return [SimRequest(f"r{i}", s.prompt_ids, s.output_len, t) for i, (s, t) in enumerate(zip(samples, times))]


def prefill_bound(profile: Profile, spec: ClusterSpec, samples) -> float:
    """Requests/s the shape's prefill GPUs could compute if they did nothing else (no prefix reuse)."""
    mean = sum(profile.prefill_time(len(s.prompt_ids)) for s in samples) / max(len(samples), 1)
    gpus = spec.num_decode * spec.decode_ep if spec.collocated else spec.num_prefill * spec.prefill_ep
    return gpus / max(mean, 1e-9)


def evaluate(profile: Profile, spec: ClusterSpec, samples, slos: dict, attainment: float = 0.9,
             burstiness: float = 1.0, seed: int = 0, iterations: int = 5) -> Evaluation:
    """Bisection on the offered rate for the highest one whose SLO attainment ≥ `attainment`."""
    ev = Evaluation(spec)

    def attain(rate: float) -> bool:
        s = simulate(profile, replace(spec), _requests(samples, rate, burstiness, seed)).summary(slos)
        ev.curve.append((rate, s["goodput"]))
        if s["slo_attainment"] >= attainment:
            if rate > ev.goodput_rate:
                ev.goodput_rate, ev.at_goodput = rate, s
            return True
        if not ev.above or rate < ev.above["rate"]:
            ev.above = dict(s, rate=rate)
        return False

    lo, hi = 0.0, 1.5 * prefill_bound(profile, spec, samples)
    while attain(hi) and hi < 1e6:  # the bound is loose when prefixes are cached: grow until a rate misses
        lo, hi = hi, hi * 2
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if attain(mid):
            lo = mid
        else:
            hi = mid
    ev.curve.sort()
    return ev


def sweep(profile: Profile, spec: ClusterSpec, samples, slos: dict, rates: list[float], burstiness: float = 1.0,
          seed: int = 0) -> list[tuple[float, float]]:
    """(offered rate, goodput req/s) at each of `rates`."""
    return [(r, simulate(profile, replace(spec), _requests(samples, r, burstiness, seed)).summary(slos)["goodput"])
            for r in rates]


def plan(profile: Profile, gpus: int, samples, slos: dict, ep_sizes: list[int], chunk_budgets: list[int],
         base: ClusterSpec | None = None, collocated: bool = True, attainment: float = 0.9,
         burstiness: float = 1.0, seed: int = 0, progress=None, refine: int = 12,
         iterations: int = 5) -> list[Evaluation]:
    """Every shape, best first. With more than `refine` shapes, a first pass ranks them on a quarter
    of the requests and only the best `refine` are evaluated on all of them."""
    candidates = shapes(gpus, ep_sizes, chunk_budgets, collocated, base)
    if len(candidates) > refine:
        coarse = samples[: max(50, len(samples) // 4)]
        first = [evaluate(profile, spec, coarse, slos, attainment, burstiness, seed, iterations=4)
                 for spec in candidates]
        first.sort(key=lambda e: -e.goodput_per_gpu)
        candidates = [e.spec for e in first[:refine]]
    out = []
    for spec in candidates:
        out.append(evaluate(profile, spec, samples, slos, attainment, burstiness, seed, iterations))
        if progress:
            progress(out[-1])
    return sorted(out, key=lambda e: -e.goodput_per_gpu)


def transient_warning(e: Evaluation, samples, factor: float = 3.0) -> str | None:
    """A goodput found while the requests arrive over less than `factor` request lifetimes is mostly
    the ramp-up, not the steady state (batches never fill): say so, with the request count needed."""
    s = e.at_goodput
    if not s or e.goodput_rate <= 0:
        return None
    mean_out = sum(x.output_len for x in samples) / max(len(samples), 1)
    life = (s["median_ttft_ms"] + s["median_tpot_ms"] * max(mean_out - 1, 0)) / 1e3
    window = len(samples) / e.goodput_rate
    if window >= factor * life:
        return None
    need = int(factor * life * e.goodput_rate) + 1
    return (f"warning: {e.spec.describe()}: {len(samples)} requests arrive in {window:.1f} s at {e.goodput_rate:.1f} "
            f"req/s, under {factor:g}× a request's life ({life:.1f} s); the figure is mostly ramp-up "
            f"(use --num-prompts ≥ {need})")


def format_table(evals: list[Evaluation], slos: dict) -> str:
    lines = ["| # | shape | GPUs | max req/s at SLO | per GPU | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | "
             "bottleneck above that rate |", "|---|---|---:|---:|---:|---|---|---|"]
    for i, e in enumerate(evals, 1):
        s = e.at_goodput
        ttft = " / ".join(f"{s.get(f'{k}_ttft_ms', 0):.0f}" for k in ("median", "p90", "p99")) if s else "-"
        tpot = " / ".join(f"{s.get(f'{k}_tpot_ms', 0):.1f}" for k in ("median", "p90", "p99")) if s else "-"
        lines.append(f"| {i} | {e.spec.describe()} | {e.spec.num_gpus} | {e.goodput_rate:.2f} | "
                     f"{e.goodput_per_gpu:.3f} | {ttft} | {tpot} | {e.bottleneck(slos)} |")
    return "\n".join(lines)


def plot(evals: list[Evaluation], path: str, title: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in evals:
        xs, ys = zip(*e.curve) if e.curve else ((), ())
        ax.plot(xs, [y / e.spec.num_gpus for y in ys], marker="o", label=e.spec.describe())
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("goodput per GPU (req/s)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main_args(args, samples) -> int:
    """Run the plan for `samples` (objects with prompt_ids and output_len: the bench dataset)."""
    profile = Profile.load(args.profile)
    if args.model and args.model != profile.model:
        print(f"pdserve plan: the profile is of {profile.model!r}, not {args.model!r}", file=sys.stderr)
        return 2
    slos = parse_slo(args.slo)
    ep_sizes = args.ep_sizes or ([e for e in (1, 2, 4, 8) if e <= args.gpus] if profile.num_moe_layers else [1])
    base = ClusterSpec(max_num_seqs=args.max_num_seqs, policy=args.policy, kv_link=parse_link(args.kv_link),
                       ep_link=parse_link(args.ep_link), gpu_memory_utilization=args.gpu_memory_utilization)
    print(f"planning {args.gpus} GPUs for {profile.model} ({profile.dtype}, profiled on {profile.device}); "
          f"SLO {args.slo} at {args.attainment:.0%}; {len(samples)} {args.dataset_name} requests; KV link "
          f"{base.kv_link.name} ({base.kv_link.bandwidth / 1e9:.0f} GB/s), EP link {base.ep_link.name}", flush=True)
    evals = plan(profile, args.gpus, samples, slos, ep_sizes, args.chunk_budgets, base, not args.no_collocated,
                 args.attainment, args.burstiness, args.seed, iterations=args.iterations,
                 progress=lambda e: print(f"  {e.spec.describe()}: {e.goodput_rate:.2f} req/s", file=sys.stderr))
    print(format_table(evals[: args.top], slos))
    for e in evals[: args.top]:
        if (warning := transient_warning(e, samples)):
            print(warning, file=sys.stderr)
    if args.plot:
        top = evals[:3]
        hi = 1.5 * max((e.goodput_rate for e in top), default=1.0) or 1.0
        rates = [hi * (k + 1) / 10 for k in range(10)]
        for e in top:  # one rate grid for all, instead of each one's bisection points
            e.curve = sweep(profile, e.spec, samples, slos, rates, args.burstiness, args.seed)
        print(plot(top, args.plot, f"{profile.model} on {args.gpus} GPUs, SLO {args.slo}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"spec": {k: str(v) if k.endswith("link") else v for k, v in asdict(e.spec).items()},
                        "goodput_rate": e.goodput_rate, "goodput_per_gpu": e.goodput_per_gpu,
                        "at_goodput": e.at_goodput, "bottleneck": e.bottleneck(slos), "curve": e.curve}
                       for e in evals], f, indent=1)
    return 0
