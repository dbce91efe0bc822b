"""Prefill steps over a cached prefix, with the piecewise prefill CUDA graphs (engine/prefill_graph.py)
and without them (eager, as before 2026-12-08), next to a fresh prompt of the same new tokens: the
step `pdserve profile` times (planner/profiler.py `measure_prefill`, median of repeats, the first run of a
shape untimed), per model, new tokens and cached prefix. The floor beside each: the step's FLOPs (weights
over the new tokens, attention over prefix + new) at the bf16 matmul rate measured in the same run.
With `--mixed-batch` / `--mixed-prompt`, also steps mixing decodes with a joining prompt's prefill (the
collocated step), piecewise against eager.

    python -m bench.prefix_prefill_bench --model deepseek-v2-lite --tokens 32,128,512,2048 \
        --cached 0,2048 --out bench/results/NAME.json

Prints a markdown table; the JSON holds every figure. On CPU (tiny models) it rehearses the flow only:
there are no graphs there, so both rows run eagerly.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time

import torch

from bench import roofline
from bench.device_probe import probe as device_probe
from engine.engine_args import build_engine_config
from engine.engine_core import EngineCore
from engine.sampling_params import SamplingParams
from planner.profiler import _Ids, _run_to_first_token, _sync, cached_prefix, measure_prefill


def _table(core: EngineCore, tokens: list[int], cached: list[int], repeats: int) -> dict:
    ids = _Ids(core.model_config.vocab_size, seed=1)
    for n in tokens:  # an untimed pass: the first row otherwise runs on a cold GPU
        measure_prefill(core, ids, n, 0, 1)
    return {f"{n}+{c}": measure_prefill(core, ids, n, c, repeats) for c in cached for n in tokens}


def measure_mixed(core: EngineCore, ids: _Ids, batch: int, prompt: int, steps: int = 8) -> float:
    """Seconds per step while `batch` sequences decode and a fresh `prompt`-token request joins at every
    step (each step: the decodes plus one prompt's prefill, as in collocated serving)."""
    long = SamplingParams(temperature=0, max_tokens=4 * steps + 64, ignore_eos=True)
    rids = [ids.rid(f"m{batch}") for _ in range(batch)]
    for rid in rids:
        core.add_request(rid, ids(128), long)
    _run_to_first_token(core, rids)
    for _ in range(3):
        core.step()
    joined = []

    def window():
        for _ in range(steps):
            rid = ids.rid(f"j{prompt}")
            core.add_request(rid, ids(prompt), long)
            joined.append(rid)
            core.step()
    window()  # untimed: the shapes' first runs
    _sync(core.runner.device)
    t0 = time.perf_counter()
    window()
    _sync(core.runner.device)
    dt = (time.perf_counter() - t0) / steps
    for rid in rids + joined:
        core.abort(rid)
    while core.has_unfinished():
        core.step()
    return dt


def profile_prefix_step(core: EngineCore, ids: _Ids, tokens: int, cached: int) -> dict:
    """One step of `tokens` new tokens after a cached prefix of `cached` under the torch profiler (the
    engine bench's view: GPU-busy ms, kernels, host time not hidden, top kernels and host ops)."""
    from bench.engine_bench import profile_steps
    prefix = cached_prefix(core, ids, cached)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    core.add_request(ids.rid("profiled"), prefix + ids(tokens), one)
    out = profile_steps(core, 1, host_ops=True)
    while core.has_unfinished():
        core.step()
    return out


def measure_engine(model: str, dtype: str, device: str, tokens: list[int], cached: list[int], repeats: int,
                   gpu_memory_utilization: float, piecewise: bool, mixed_batch: list[int] = (),
                   mixed_prompt: list[int] = (), profile: tuple[int, int] | None = None) -> dict:
    """One engine (piecewise prefill graphs on or off): its prefill table, mixed steps and profile."""
    config = build_engine_config(model, dtype=dtype, device=device, load_format="dummy",
                                 max_model_len=max(cached) + max(tokens) + 256, enable_prefix_cache=True,
                                 max_num_batched_tokens=max([*tokens, *(b + 8 + p for b in mixed_batch
                                                                        for p in mixed_prompt)]),
                                 max_num_seqs=max([16, *(b + 16 for b in mixed_batch)]),
                                 gpu_memory_utilization=gpu_memory_utilization, prefill_graph_piecewise=piecewise)
    core = EngineCore(config)
    pg = core.runner.prefill_graphs
    ids = _Ids(core.model_config.vocab_size, seed=2)
    return {"dtype": str(core.model_config.dtype), "piecewise_captured": bool(pg is not None and pg.piecewise
                                                                               and pg.pieces),
            "seconds": _table(core, tokens, cached, repeats),
            "mixed": {f"{b}+{p}": measure_mixed(core, ids, b, p) for b in mixed_batch for p in mixed_prompt},
            "profile": profile_prefix_step(core, ids, *profile) if profile else None}


def run(model: str, dtype: str, device: str, tokens: list[int], cached: list[int], repeats: int,
        gpu_memory_utilization: float, mixed_batch: list[int] = (), mixed_prompt: list[int] = (),
        profile: tuple[int, int] | None = None) -> dict:
    """Both engines, each in a process of its own (one engine's memory never stands in the other's way)."""
    probe = device_probe(device) if device == "cuda" else None
    if probe:
        torch.cuda.empty_cache()  # the probe's buffers (2 GiB and more) back to the device for the engines
    parts = {}
    for name in ("piecewise", "eager"):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            csv = lambda xs: ",".join(map(str, xs))  # noqa: E731
            argv = [sys.executable, "-m", "bench.prefix_prefill_bench", "--model", model, "--dtype", dtype,
                    "--device", device, "--tokens", csv(tokens), "--cached", csv(cached), "--repeats", str(repeats),
                    "--gpu-memory-utilization", str(gpu_memory_utilization), "--mixed-batch", csv(mixed_batch),
                    "--mixed-prompt", csv(mixed_prompt), "--profile", csv(profile or ()), "--one-engine", name,
                    "--out", f.name]
            subprocess.run(argv, check=True)
            parts[name] = json.load(open(f.name))
    from engine.presets import resolve_model
    mc = resolve_model(model, dtype)
    floors = {}
    if probe:
        rate = probe["bf16_matmul_flops_per_s"]
        for c in cached:
            for n in tokens:
                # the weights over the new tokens, the attention over the prefix and the new tokens
                flops = roofline.prefill_flops(mc, n) - roofline.attention_flops(mc, n) + roofline.attention_flops(
                    mc, n, c)
                floors[f"{n}+{c}"] = flops / rate
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "model": model, "dtype": parts["piecewise"]["dtype"], "commit": commit,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "probe": probe,
            "piecewise_captured": parts["piecewise"]["piecewise_captured"], "tokens": tokens, "cached": cached,
            "repeats": repeats, "seconds": {k: v["seconds"] for k, v in parts.items()}, "floor_s": floors,
            "mixed_batch": list(mixed_batch), "mixed_prompt": list(mixed_prompt),
            "mixed_seconds": {k: v["mixed"] for k, v in parts.items()},
            "profile_step": list(profile) if profile else None,
            "profiles": {k: v["profile"] for k, v in parts.items() if v["profile"]}}


def table(res: dict) -> str:
    lines = [f"{res['model']} ({res['dtype']}) on {res['device']}, commit {res['commit'][:8]}; piecewise graphs "
             f"captured: {res['piecewise_captured']}",
             "", "| new tokens | cached | fresh prompt ms | over the prefix, piecewise ms | eager ms "
                 "| eager / piecewise | floor ms (piecewise % of floor) |", "|---|---|---|---|---|---|---|"]
    s = res["seconds"]
    for c in res["cached"]:
        if c == 0:
            continue
        for n in res["tokens"]:
            k = f"{n}+{c}"
            pw, eg, fresh = s["piecewise"][k] * 1e3, s["eager"][k] * 1e3, s["piecewise"][f"{n}+0"] * 1e3
            floor = res["floor_s"].get(k)
            fl = f"{floor * 1e3:.2f} ({floor * 1e3 / pw:.0%})" if floor else "-"
            lines.append(f"| {n} | {c} | {fresh:.1f} | {pw:.1f} | {eg:.1f} | {eg / pw:.2f}× | {fl} |")
    if res.get("mixed_batch"):
        m = res["mixed_seconds"]
        lines += ["", "| decoding | joining prompt (each step) | step ms, piecewise | eager | eager / piecewise |",
                  "|---|---|---|---|---|"]
        for k in m["piecewise"]:
            b, p = k.split("+")
            lines.append(f"| {b} | {p} | {m['piecewise'][k] * 1e3:.2f} | {m['eager'][k] * 1e3:.2f} | "
                         f"{m['eager'][k] / m['piecewise'][k]:.2f}× |")
    for name, p in res.get("profiles", {}).items():
        if p:
            n, c = res["profile_step"]
            lines.append(f"\n{name}, {n} new tokens after {c} cached, under the profiler: "
                         f"{p['profiled_ms_per_step']:.2f} ms, GPU busy {p['gpu_busy_ms']:.2f} ms, "
                         f"{p['kernels_per_step']:.0f} kernels, host not hidden {p['host_not_hidden_ms']:.2f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-deepseek-v2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", default="32,128,512,2048")
    ap.add_argument("--cached", default="0,2048")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mixed-batch", default="", help="decoding batches of the mixed-step table (e.g. 16,64)")
    ap.add_argument("--mixed-prompt", default="", help="prompt tokens joining at every step (e.g. 128,512)")
    ap.add_argument("--profile", default="", help="NEW,CACHED: one such step under the torch profiler per engine")
    ap.add_argument("--one-engine", choices=("piecewise", "eager"), default=None,
                    help="(internal) measure that engine alone and write its part to --out")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cached = sorted({0, *(int(x) for x in a.cached.split(","))})
    ints = lambda x: [int(v) for v in x.split(",") if v]  # noqa: E731
    if a.one_engine:
        part = measure_engine(a.model, a.dtype, a.device, ints(a.tokens), cached, a.repeats, a.gpu_memory_utilization,
                              a.one_engine == "piecewise", ints(a.mixed_batch), ints(a.mixed_prompt),
                              tuple(ints(a.profile)) or None)
        with open(a.out, "w") as f:
            json.dump(part, f)
        return 0
    res = run(a.model, a.dtype, a.device, ints(a.tokens), cached, a.repeats, a.gpu_memory_utilization,
              ints(a.mixed_batch), ints(a.mixed_prompt), tuple(ints(a.profile)) or None)
    print(table(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
