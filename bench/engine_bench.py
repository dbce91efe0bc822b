"""Engine benchmark for one model: decode tokens/s at several batch sizes and prefill tokens/s,
each next to its roofline floor and (with --hf-baseline) HF transformers on the same weights.

    python -m bench.engine_bench --model qwen3-8b --dtype bfloat16 --batch 1,16,64 --hf-baseline --out DIR

Decode is timed over steady-state steps only (every request past its prefill, CUDA graphs on);
prefill is one step of a single prompt (prefix cache off, so nothing is reused). With overlap
scheduling (the default) a step call launches one step and reports the one before, so steady-state
wall time per call is the step time. `--profile` adds, per batch, the torch profiler's view of the
same steps: GPU-busy ms per step (union of device activity), kernels per step, and the host time
not hidden behind the GPU (wall - busy); `--engine-process` times the same batch-1 decode through
the engine process (ZMQ split) as the inter-token gap a front sees.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import sys
import time

import torch

from bench import roofline
from bench.record import emit
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.engine_args import build_engine_config
from engine.presets import resolve_model
from engine.sampling_params import SamplingParams
from engine.weight_loader import load_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_decode(core: EngineCore, batch: int, prompt_len: int, steps: int, seed: int,
                   profile: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = core.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=steps + 64, ignore_eos=True)  # never ends while timed/profiled
    rids = [f"d{batch}-{i}" for i in range(batch)]
    for rid in rids:
        core.add_request(rid, torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), params)
    reqs = [core.requests[r] for r in rids]
    while any(not r.output_token_ids for r in reqs):
        core.step()
    for _ in range(3):
        core.step()
    device = core.runner.device
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        core.step()
    _sync(device)
    dt = time.perf_counter() - t0
    prof = profile_steps(core, min(steps, 16)) if profile else None
    for rid in rids:
        core.abort(rid)
    while core.has_unfinished():
        core.step()
    graphs = core.runner.graphs is not None and batch <= core.runner.graphs.max_batch
    out = {"batch": batch, "steps": steps, "ms_per_step": dt / steps * 1e3, "tok_s": batch * steps / dt,
           "context": prompt_len + steps, "cuda_graphs": graphs}
    if prof:
        out.update(prof)
        # The profiler slows the host and adds per-kernel tracing gaps; the timed (unprofiled) steps
        # against the same GPU-busy time show what the host leaves exposed without it.
        out["host_not_hidden_timed_ms"] = max(0.0, out["ms_per_step"] - prof["gpu_busy_ms"])
    return out


def profile_steps(core: EngineCore, steps: int, host_ops: bool = False) -> dict:
    """GPU-busy time (union of kernel/copy intervals), kernels per step and the host time that nothing
    hides, over `steps` steady-state steps under the torch profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = core.runner.device
    if device.type != "cuda":
        return {}
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            core.step()
        _sync(device)
        wall = time.perf_counter() - t0
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # union of intervals, in microseconds
        if b > end:
            busy += b - max(a, end)
            end = b
    busy_ms = busy / 1e3 / steps
    wall_ms = wall * 1e3 / steps
    return {"gpu_busy_ms": busy_ms, "kernels_per_step": len(spans) / steps, "profiled_ms_per_step": wall_ms,
            "host_not_hidden_ms": max(0.0, wall_ms - busy_ms), "top_kernels": top_kernels(events, steps),
            **({"top_host_ops": top_host_ops(prof, steps)} if host_ops else {})}


def top_host_ops(prof, steps: int, n: int = 15) -> list[list]:
    """[op, calls per step, self CPU µs per step] of the n host ops (torch ops, CUDA runtime calls)
    with the most self time: where a step's host time goes (launches, syncs, allocations)."""
    rows = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:n]
    return [[a.key[:70], a.count / steps, a.self_cpu_time_total / steps] for a in rows]


def top_kernels(events, steps: int, n: int = 15) -> list[list]:
    """[name (truncated), launches per step, GPU µs per step] of the n kernels with the most time."""
    agg: dict[str, list[float]] = {}
    for e in events:
        a = agg.setdefault(e.name[:70], [0, 0.0])
        a[0] += 1
        a[1] += e.time_range.end - e.time_range.start
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])[:n]
    return [[name, c / steps, us / steps] for name, (c, us) in rows]


def profile_prefill(core: EngineCore, tokens: int, seed: int) -> dict:
    """One prefill step of `tokens` under the profiler: its kernels, busy time and top kernels."""
    gen = torch.Generator().manual_seed(seed)
    core.add_request("profiled-prefill", torch.randint(0, core.model_config.vocab_size, (tokens,), generator=gen).tolist(),
                     SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    out = profile_steps(core, 1, host_ops=True)
    while core.has_unfinished():
        core.step()
    return out


def measure_engine_process(config: EngineConfig, prompt_len: int, steps: int) -> dict:
    """Batch-1 decode through the engine process: the median gap between a front's token deltas."""
    from engine.engine_client import EngineClient

    client = EngineClient(config, detokenize=False)
    try:
        gen = torch.Generator().manual_seed(3)
        ids = torch.randint(0, client.model_config.vocab_size, (prompt_len,), generator=gen).tolist()
        stream = client.add_request(ids, SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
        stamps = []
        for delta in stream:
            stamps += [time.perf_counter()] * len(delta.token_ids)
        gaps = sorted(b - a for a, b in zip(stamps[8:], stamps[9:]))
        return {"itl_ms_p50": gaps[len(gaps) // 2] * 1e3, "tokens": len(stamps)}
    finally:
        client.shutdown()


def measure_prefill(core: EngineCore, tokens: int, seed: int, repeats: int = 3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = core.model_config.vocab_size
    device = core.runner.device
    best = float("inf")
    for i in range(repeats + 1):
        rid = f"p{tokens}-{i}"
        core.add_request(rid, torch.randint(0, vocab, (tokens,), generator=gen).tolist(),
                         SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        _sync(device)
        t0 = time.perf_counter()
        outs = core.step()
        while not any(o.request_id == rid and o.finished for o in outs):  # overlap: reported one call later
            assert core.has_unfinished(), "prefill did not finish in one step"
            outs = core.step()
        _sync(device)
        dt = time.perf_counter() - t0
        if i > 0:  # the first one compiles kernels
            best = min(best, dt)
    return {"tokens": tokens, "seconds": best, "tok_s": tokens / best}


def run(args) -> dict:
    mc = resolve_model(args.model, args.dtype)
    if args.num_layers:  # a full-width model cut to its first layers (one GPU cannot hold all of them)
        mc = dataclasses.replace(mc, hf={**mc.hf, "num_hidden_layers": args.num_layers})
    fp8 = bool(args.quantization) or (mc.hf.get("quantization_config") or {}).get("quant_method") == "fp8"
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.dtype == "auto":
        mc = dataclasses.replace(mc, dtype=torch.float32)
    probe = None
    if device.type == "cuda":
        from bench.device_probe import probe as run_probe
        probe = run_probe(str(device))
    hf_results, model = None, None
    if args.hf_baseline:
        from bench import hf_baseline
        hf = hf_baseline.build_hf_model(mc.hf, str(device), mc.dtype)
        hf_results = {"decode": [hf_baseline.time_decode(hf, b, args.prompt_len, args.hf_decode_steps, mc.vocab_size,
                                                         str(device)) for b in args.batch],
                      "prefill": hf_baseline.time_prefill(hf, args.prefill_len, mc.vocab_size, str(device))}
        model = load_model(mc, device, weights=hf.state_dict().items())
        del hf
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.quantization and model is None:
        model = load_model(mc, device, "dummy", quantization=args.quantization)
    config: EngineConfig = build_engine_config(
        args.model, dtype=str(mc.dtype).removeprefix("torch."), device=str(device), load_format="dummy",
        quantization=args.quantization,
        max_model_len=args.max_model_len, enable_prefix_cache=False, max_num_seqs=max(args.batch),
        max_num_batched_tokens=max(args.prefill_len, max(args.batch)), gpu_memory_utilization=args.gpu_mem,
        num_pages=args.num_pages, cuda_graph_max_batch=max(args.batch), overlap_schedule=not args.no_overlap,
        prefill_graph_max_tokens=args.prefill_graph_max_tokens,
        decode_graph_short_context=args.decode_graph_short_context)
    core = EngineCore(config, model=model, model_config=mc)
    backend_name, moe_backend = core.runner.backend.name, _moe_backend(core)
    decode = [measure_decode(core, b, args.prompt_len, args.decode_steps, seed=b, profile=args.profile)
              for b in args.batch]
    prefill = measure_prefill(core, args.prefill_len, seed=7)
    if args.profile:
        prefill["profile"] = profile_prefill(core, args.prefill_len, seed=8)
    prefill_graphs = core.runner.prefill_graphs.sizes if core.runner.prefill_graphs is not None else None
    engine_process = None
    if args.engine_process:  # the weights and KV of this process's engine go first: the engine process loads its own
        del core, model
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        engine_process = measure_engine_process(config, args.prompt_len, args.decode_steps)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "model": args.model,
              "dtype": str(mc.dtype) + (f" + {args.quantization} weights" if args.quantization else ""),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "attention_backend": backend_name,
              "prefill_graphs": prefill_graphs,
              "moe_backend": moe_backend, "probe": probe,
              "decode": decode, "prefill": prefill, "hf": hf_results, "engine_process": engine_process,
              "overlap_schedule": config.overlap_schedule, "num_layers": args.num_layers,
              "decode_gemm_choices": _decode_gemm_choices() if device.type == "cuda" else None,
              "moe_decode_choices": _moe_decode_choices() if device.type == "cuda" else None}
    if probe:
        hbm, flops = probe["hbm_copy_bytes_per_s"], probe["bf16_matmul_flops_per_s"]
        for d in decode:
            f = roofline.floors(mc, hbm, flops, d["batch"], d["context"], args.prefill_len,
                                fp8_weights=fp8)
            d["floor_ms_per_step"] = f["decode_step_floor_s"] * 1e3
            d["ceiling_tok_s"] = f["decode_tok_s_ceiling"]
            d["bytes_per_step"] = f["decode_bytes"]
        f = roofline.floors(mc, hbm, flops, 1, 0, args.prefill_len)
        prefill["floor_s"], prefill["ceiling_tok_s"], prefill["flops"] = (
            f["prefill_floor_s"], f["prefill_tok_s_ceiling"], f["prefill_flops"])
    return result


def _decode_gemm_choices() -> list[dict]:
    """The kernel the decode GEMM tuner picked per (token bucket, weight shape, weight dtype)."""
    from engine.kernels.decode_gemm import chosen, chosen_bmm, timings
    def desc(c) -> dict:
        return dict(kernel=type(c).__name__, tiles=c if isinstance(c, str) else dataclasses.asdict(c))
    timed = timings()
    def row(key, c, **shape) -> dict:
        return dict(**shape, **desc(c), timed_ms=[dict(ms=round(ms, 5), **desc(t)) for ms, t in timed.get(key, [])])
    # keys: (device index, bucket, weight shape, weight dtype, [block, quantization,] x dtype[, gated])
    return ([row(key, c, bucket=key[1], n=key[2][0], k=key[2][1], weight_dtype=str(key[3]), gated=key[7])
             for key, c in chosen().items()]
            + [row(key, c, bucket=key[1], bmm=list(key[2]), weight_dtype=str(key[3])) for key, c in chosen_bmm().items()])


def _moe_decode_choices() -> list[dict]:
    """The tiles the decode-MoE tuner picked per (token bucket, expert shapes, FP8 mode)."""
    from engine.kernels.moe_decode import _chosen
    return [dict(bucket=key[1], top_k=key[2], w13=list(key[3]), w2=list(key[4]), weight_dtype=str(key[5]),
                 block=key[7], tiles=c._asdict()) for key, c in _chosen.items()]


def _moe_backend(core: EngineCore) -> str:
    if not core.model_config.is_moe:
        return "none"
    if core.runner.device.type != "cuda":
        return "torch reference (CPU)"
    try:
        import engine.kernels.fused_moe  # noqa: F401
        return "triton fused_moe (local experts, ep_size=1)"
    except ImportError:
        return "torch fallback"


def markdown(r: dict) -> str:
    cut = f", first {r['num_layers']} layers" if r.get("num_layers") else ""
    lines = [f"### {r['model']} ({r['dtype']}{cut}) on {r['device']} — {r['date']}", "",
             f"`{r['command']}`", "",
             f"torch {r['torch']}, attention backend `{r['attention_backend']}`, MoE: {r['moe_backend']}, "
             f"prefill CUDA graphs: {r.get('prefill_graphs') or 'off'}"]
    if r["probe"]:
        p = r["probe"]
        lines.append(f"Measured in the same run: HBM copy {p['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), "
                     f"bf16 matmul {p['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s.")
    lines += ["", "| metric | ours | floor → ceiling | ours / ceiling | HF transformers | ours / HF |",
              "|---|---|---|---|---|---|"]
    hf = r.get("hf") or {}
    for i, d in enumerate(r["decode"]):
        h = hf["decode"][i] if hf else None
        ceil = d.get("ceiling_tok_s")
        floor = (f"{d['floor_ms_per_step']:.2f} ms/step ({d['bytes_per_step'] / 1e9:.2f} GB) → {ceil:,.0f} tok/s"
                 if ceil else "–")
        lines.append(f"| decode tok/s, batch {d['batch']} (ctx {d['context']}) | {d['tok_s']:,.0f} "
                     f"({d['ms_per_step']:.2f} ms/step{', graphs' if d['cuda_graphs'] else ''}) | {floor} | "
                     f"{d['tok_s'] / ceil:.0%} |" if ceil else f"| decode tok/s, batch {d['batch']} | {d['tok_s']:,.1f} | – | – |")
        lines[-1] += (f" {h['tok_s']:,.0f} ({h['ms_per_step']:.1f} ms/step) | {d['tok_s'] / h['tok_s']:.1f}× |"
                      if h else " – | – |")
    p, h = r["prefill"], hf.get("prefill") if hf else None
    prof = [d for d in r["decode"] if "gpu_busy_ms" in d]
    ceil = p.get("ceiling_tok_s")
    row = f"| prefill tok/s, {p['tokens']} tokens | {p['tok_s']:,.0f} ({p['seconds'] * 1e3:.1f} ms) |"
    row += (f" {p['floor_s'] * 1e3:.1f} ms ({p['flops'] / 1e12:.1f} TFLOP) → {ceil:,.0f} tok/s | {p['tok_s'] / ceil:.0%} |"
            if ceil else " – | – |")
    row += f" {h['tok_s']:,.0f} | {p['tok_s'] / h['tok_s']:.1f}× |" if h else " – | – |"
    lines.append(row)
    if prof:
        lines += ["", f"Profiled steps (overlap scheduling {'on' if r.get('overlap_schedule', True) else 'off'}):", "",
                  "| batch | wall ms/step | GPU-busy ms/step | host not hidden | timed wall − busy | kernels/step |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {d['batch']} | {d['profiled_ms_per_step']:.2f} | {d['gpu_busy_ms']:.2f} | "
                  f"{d['host_not_hidden_ms']:.2f} ms ({d['host_not_hidden_ms'] / d['profiled_ms_per_step']:.0%}) | "
                  f"{d['host_not_hidden_timed_ms']:.2f} ms ({d['host_not_hidden_timed_ms'] / d['ms_per_step']:.0%}) | "
                  f"{d['kernels_per_step']:.0f} |" for d in prof]
    tables = [(f"decode batch {d['batch']}", d.get("top_kernels")) for d in prof[:1]]
    tables.append((f"prefill {p['tokens']}", (p.get("profile") or {}).get("top_kernels")))
    tables.append((f"prefill {p['tokens']}, host ops by self CPU time", (p.get("profile") or {}).get("top_host_ops")))
    for title, rows in tables:
        if rows:
            lines += ["", f"Top kernels, {title} (per step):", "", "| name | calls | µs |", "|---|---:|---:|"]
            lines += [f"| `{name}` | {c:.0f} | {us:.0f} |" for name, c, us in rows]
    ep = r.get("engine_process")
    if ep:
        b1 = next((d for d in r["decode"] if d["batch"] == 1), None)
        extra = f" ({ep['itl_ms_p50'] / b1['ms_per_step'] - 1:+.1%} vs the in-process batch-1 step)" if b1 else ""
        lines += ["", f"Through the engine process (ZMQ): batch-1 inter-token gap p50 {ep['itl_ms_p50']:.2f} ms{extra}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quantization", choices=["fp8"], default=None, help="block-scaled FP8 dummy weights")
    ap.add_argument("--num-layers", type=int, default=None, help="keep only the model's first N layers")
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--hf-decode-steps", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--gpu-mem", type=float, default=0.85)
    ap.add_argument("--hf-baseline", action="store_true")
    ap.add_argument("--profile", action="store_true", help="GPU-busy, kernels and unhidden host time per step")
    ap.add_argument("--engine-process", action="store_true", help="also time batch-1 decode through the engine process")
    ap.add_argument("--no-overlap", action="store_true", help="disable overlap scheduling")
    ap.add_argument("--decode-graph-short-context", type=int, default=EngineConfig.decode_graph_short_context,
                    help="also capture decode graphs sized for contexts up to N (0: off; default: the engine's)")
    ap.add_argument("--prefill-graph-max-tokens", type=int, default=EngineConfig.prefill_graph_max_tokens,
                    help="largest prefill replayed as CUDA graphs (0: eager prefill; default: the engine's)")
    ap.add_argument("--out", default=None, help="directory for <model>.md and <model>.json")
    args = ap.parse_args(argv)
    r = run(args)
    emit(r, markdown(r), args.out, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
