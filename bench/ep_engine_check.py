"""Expert parallelism end to end on the GPUs of one host, with no transport in between: each rank
is an `EngineCore` in its own spawned process (NCCL between the ranks), driven step by step here
as a node's engine processes are, so it needs neither pyzmq nor a tokenizer.

For one model (DeepSeek-V2-Lite, dummy bf16 weights, by default) and each configuration — one GPU;
EP = N with decode CUDA graphs; EP = N eager — it measures:
* decode: `batch` requests per rank, the median step time once every request decodes (EP = N
  serves N × batch at that step time), and whether the EP ranks replayed graphs;
* prefill: one `prefill`-token prompt per rank, the step time without overlap (one dispatch per
  MoE layer), with two-batch overlap across whole layers (`two_batch`: two micro-batches
  interleaved through the model, engine/ep/two_batch.py) and with the per-layer overlap (`overlap`:
  two micro-batches inside each MoE layer only) — `--prefill-variants` picks them;
* tokens: rank 0's greedy tokens against the one-GPU engine on the same prompts (bf16: summation
  order differs across ranks, so the fraction of equal tokens is reported).
Floors from `bench/roofline.py` with the HBM bandwidth and matmul rate measured in the same run
(`bench/device_probe.py`): a decode step's weight + KV bytes, a prefill's FLOPs.
`python -m bench.ep_engine_check --out DIR` prints JSON and writes `ep_engine.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

import torch
import torch.multiprocessing as mp


def _prompts(first: int, count: int, length: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 1000 + 10 for j in range(length + (i % 5) * 9)] for i in range(first, first + count)]


def _drive(core, requests) -> tuple[dict, list]:
    """Run `requests` to the end on this rank (in lock-step with the other ranks); per step: seconds
    and outputs."""
    ep = core.runner.ep
    for rid, prompt, params in requests:
        core.add_request(rid, prompt, params)
    tokens = {rid: [] for rid, _, _ in requests}
    steps = []
    while True:
        busy = ep.group.agree(core.has_unfinished(), False)[0] if ep is not None else core.has_unfinished()
        if not busy:
            return tokens, steps
        t0 = time.perf_counter()
        outs = core.step()  # ends with the sampled tokens on the host: the GPU work is done
        steps.append((time.perf_counter() - t0, len(outs)))
        for o in outs:
            if o.request_id in tokens:
                tokens[o.request_id].extend(o.token_ids)


def _rank(rank: int, world: int, init: str, args: dict, queue) -> None:
    from engine.engine_core import EngineCore
    from engine.llm import build_engine_config
    from engine.sampling_params import SamplingParams

    cuda = args["device"] == "cuda"
    out = {"rank": rank}
    if cuda:
        torch.cuda.set_device(rank)
    if cuda and world == 1:
        from bench.device_probe import probe
        out["probe"] = probe(f"cuda:{rank}")
    device = f"cuda:{rank}" if cuda else "cpu"  # the CPU (gloo) form is a dry run of this script
    config = build_engine_config(args["model"], load_format="dummy", dtype=args["dtype"], device=device,
                                 max_model_len=args["prefill"] + 256, ep_size=world, max_num_seqs=args["batch"],
                                 max_num_batched_tokens=max(8192, args["prefill"]), gpu_memory_utilization=0.85,
                                 enable_prefix_cache=False, enforce_eager=args["eager"],
                                 **({"ep_dispatch_fp8": args["fp8_dispatch"], "ep_backend": args["ep_backend"]}
                                    if world > 1 else {}))
    config = replace(config, parallel=replace(config.parallel, ep_rank=rank, dist_init_method=init))
    core = EngineCore(config)
    ep = core.runner.ep
    out["graphs"] = core.runner.graphs is not None
    out["backend"] = ep.backend_name if ep is not None else "local"
    greedy = SamplingParams(temperature=0.0, max_tokens=args["decode_tokens"], ignore_eos=True)
    _drive(core, [(f"warm{i}", p, replace(greedy, max_tokens=4)) for i, p in enumerate(_prompts(0, 4, 64))])
    reqs = [(f"r{i}", p, greedy) for i, p in enumerate(_prompts(rank * args["batch"], args["batch"], args["prompt"]))]
    tokens, steps = _drive(core, reqs)
    decode = [s for s, n in steps if n == args["batch"]][2:]  # every request decoding, past the first steps
    out.update(tokens=[tokens[rid] for rid, _, _ in reqs], decode_step_ms=1e3 * statistics.median(decode),
               decode_steps=len(decode))
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    cap = args["prefill"]
    split_from = max(2, min(512, cap // 2))  # steps this large (busiest rank) overlap: the prefill does
    knobs = {"no_overlap": dict(ep_dispatch_capacity=cap, ep_overlap_min_tokens=0, ep_two_batch_min_tokens=0),
             "two_batch": dict(ep_dispatch_capacity=cap, ep_overlap_min_tokens=0, ep_two_batch_min_tokens=split_from),
             "overlap": dict(ep_dispatch_capacity=cap, ep_overlap_min_tokens=split_from, ep_two_batch_min_tokens=0)}
    variants = {"single": {}} if ep is None else {v: knobs[v] for v in args["prefill_variants"]}
    for name, knobs in variants.items():
        if ep is not None:  # the settings are frozen: the EP runtime reads a changed copy
            ep.parallel = replace(ep.parallel, **knobs)
        times = []
        for i in range(args["prefill_repeats"] + 1):
            prompt = [(31 * i + 7 * j + rank) % 1000 + 10 for j in range(args["prefill"])]
            _, steps = _drive(core, [(f"p{name}{i}", prompt, one)])
            times.append(sum(s for s, _ in steps))  # launch + the wait for its token (overlap scheduling)
        out[f"prefill_{name}_ms"] = 1e3 * statistics.median(times[1:])  # the first one warms up
        if ep is not None:  # did the variant's steps really run as two micro-batches?
            out[f"prefill_{name}_two_batch_steps"] = ep.num_two_batch_steps
    queue.put(out)
    queue.close()
    queue.join_thread()
    os._exit(0)  # skip process-group teardown (can stall after NCCL graph capture)


def run_config(world: int, args: dict, timeout_s: float) -> list[dict]:
    from engine.ports import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank, args=(r, world, init, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=timeout_s) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return sorted(results, key=lambda r: r["rank"])


def floors(model: str, probe: dict, batch: int, context: int, prefill: int, world: int) -> dict:
    from bench.roofline import _kv_bytes_per_token, experts_touched, param_counts, prefill_flops
    from engine.presets import resolve_model

    mc = resolve_model(model, "auto")
    pc = param_counts(mc)
    hbm, flops = probe["hbm_copy_bytes_per_s"], probe["bf16_matmul_flops_per_s"]
    kv = batch * context * _kv_bytes_per_token(mc, 2)

    def step_bytes(total_batch: int, ranks: int) -> float:  # one GPU's share: dense weights + its experts
        experts = pc.per_expert * pc.moe_layers * experts_touched(pc.num_experts, pc.top_k, total_batch) / ranks
        return 2 * (pc.dense + experts) + kv
    return {"decode_step_floor_ms_1gpu": 1e3 * step_bytes(batch, 1) / hbm,
            "decode_step_floor_ms_ep": 1e3 * step_bytes(batch * world, world) / hbm,
            "prefill_floor_ms_1gpu": 1e3 * prefill_flops(mc, prefill) / flops,
            "prefill_floor_ms_ep": 1e3 * prefill_flops(mc, prefill) / flops}  # per rank: its own prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deepseek-v2-lite")
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="decode requests per rank")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--prefill-repeats", type=int, default=2)
    ap.add_argument("--configs", default="single,ep_graphs,ep_eager")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--device", default="cuda", help="cuda | cpu (a dry run on gloo ranks, e.g. tiny-deepseek-v3)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill-variants", default="no_overlap,two_batch,overlap",
                    help="EP prefill variants: no_overlap | two_batch (whole layers) | overlap (per MoE layer)")
    ap.add_argument("--fp8-dispatch", action="store_true", help="EP ranks send activations as FP8")
    ap.add_argument("--ep-backend", default="auto", help="EP all-to-all: auto | fixed | symm | torch | deepep")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    args = dict(model=a.model, batch=a.batch, prompt=a.prompt, decode_tokens=a.decode_tokens, prefill=a.prefill,
                prefill_repeats=a.prefill_repeats, device=a.device, dtype=a.dtype,
                prefill_variants=a.prefill_variants.split(","), fp8_dispatch=a.fp8_dispatch, ep_backend=a.ep_backend)
    report = {"model": a.model, "ep": a.ep, "batch_per_rank": a.batch, "prompt": a.prompt,
              "fp8_dispatch": a.fp8_dispatch, "ep_backend": a.ep_backend,
              "decode_tokens": a.decode_tokens, "prefill_tokens": a.prefill,
              "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"}
    for name in a.configs.split(","):
        world, eager = (1, False) if name == "single" else (a.ep, name == "ep_eager")
        t0 = time.time()
        try:
            ranks = run_config(world, dict(args, eager=eager), a.timeout)
        except Exception as exc:  # report what failed and go on with the next configuration
            report[name] = {"error": repr(exc), "seconds": time.time() - t0}
        else:
            report[name] = {"ranks": ranks, "seconds": time.time() - t0}
            if "probe" in ranks[0]:
                report["probe"] = ranks[0]["probe"]
        _write(report, a.out)
    if "probe" in report:
        report["floors"] = floors(a.model, report["probe"], a.batch, a.prompt + a.decode_tokens // 2, a.prefill, a.ep)
    single = report.get("single", {}).get("ranks")
    for name in ("ep_graphs", "ep_eager"):
        ranks = report.get(name, {}).get("ranks")
        if single and ranks:
            a_tok, b_tok = single[0]["tokens"], ranks[0]["tokens"]
            same = sum(x == y for ra, rb in zip(a_tok, b_tok) for x, y in zip(ra, rb))
            report[name]["equal_token_fraction_vs_single"] = same / max(1, sum(len(r) for r in a_tok))
            report[name]["first_token_equal"] = sum(ra[:1] == rb[:1] for ra, rb in zip(a_tok, b_tok))
    _write(report, a.out)
    print(json.dumps(_summary(report), indent=1))


def _summary(report: dict) -> dict:
    keep = ("graphs", "backend", "decode_step_ms", "decode_steps", "prefill_single_ms", "prefill_overlap_ms",
            "prefill_no_overlap_ms", "prefill_two_batch_ms", "prefill_two_batch_two_batch_steps")
    out = {k: v for k, v in report.items() if k not in ("single", "ep_graphs", "ep_eager")}
    for name in ("single", "ep_graphs", "ep_eager"):
        if name in report:
            entry = {k: v for k, v in report[name].items() if k != "ranks"}
            entry["ranks"] = [{k: r[k] for k in keep if k in r} for r in report[name].get("ranks", [])]
            out[name] = entry
    return out


def _write(report: dict, out_dir: str | None) -> None:
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "ep_engine.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
