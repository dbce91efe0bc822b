"""EP dispatch / combine across the GPUs of one host, for each all-to-all backend that loads.

One process per GPU (NCCL), DeepSeek-V3's MoE shape by default (hidden 7168, 256 routed experts
split evenly over the ranks, top-8 from random router logits). Per rank and step it times, with
CUDA events between barriers (median of repeats):

* dispatch: each token sent once to every rank owning one of its experts (+ ids and weights);
* combine: the per-rank partial sums sent back and added up;
* for graph-safe backends (`fixed`, the engine's default; `symm`, its rows over symmetric memory;
  `*_fp8`, their FP8-activation forms),
  dispatch + combine captured in one CUDA graph and replayed, as a decode step runs them: once per
  barrier (the ranks' host skew included), and `--loop` times back to back after one barrier (the
  steady state of a decode step's many MoE layers). The count-based `torch` backend is timed
  eagerly for comparison.

Floor: the bytes a rank sends to *other* ranks (the slowest rank's) over the GPU→GPU copy
bandwidth measured in the same run between two GPUs (a `copy_` from cuda:0 to cuda:1); each row
reports the achieved rate (2 x those bytes / the best dispatch + combine time) and the % of the
floor. It also checks, at a reduced expert count, that the expert-parallel MoE output equals the
one-GPU output. `python -m bench.ep_bench --out DIR` prints a Markdown table and writes JSON;
`--cpu` runs the same code on gloo CPU ranks at a tiny shape (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.multiprocessing as mp

from bench.record import emit


def peer_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of one large cuda:0 → cuda:1 copy (what a dispatch's cross-GPU traffic rides on)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    times = []
    for i in range(8):
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream("cuda:0"))
        dst.copy_(src)
        end.record(torch.cuda.current_stream("cuda:0"))
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    return nbytes / (statistics.median(times) / 1e3)


def host_copy_bandwidth(nbytes: int = 1 << 26) -> float:
    """CPU stand-in for the peer copy (`--cpu` smoke runs only: no floor meaning)."""
    src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def _host_time_ms(fn, repeats: int, warmup: int = 2, before=None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _backend(kind: str, group, per_rank: int, hidden: int, top_k: int, max_tokens: int):
    """`fixed`, `symm`, `torch`, `deepep`, and `<fixed|symm>_fp8` (FP8 activations)."""
    from engine.ep.runtime import select_all_to_all

    base, fp8 = kind.removesuffix("_fp8"), kind.endswith("_fp8")
    return select_all_to_all(base, group, per_rank, hidden, max_tokens_per_rank=max_tokens, fp8=fp8, top_k=top_k,
                             dtype=torch.bfloat16)


def _worker(rank: int, world: int, init: str, args: dict, queue) -> None:
    from engine.ep.group import EPGroup
    from engine.ep.runtime import select_all_to_all
    from engine.eplb import ExpertMap, initial_placement

    cpu = args["cpu"]
    if cpu:
        dev = torch.device("cpu")
    else:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    group = EPGroup(rank, world, init, dev)
    hidden, experts, top_k = args["hidden"], args["experts"], args["top_k"]
    per_rank = experts // world
    emap = ExpertMap(initial_placement(1, experts, experts, world), dev)
    rows = []

    def sync():
        group.barrier()
        if not cpu:
            torch.cuda.synchronize(dev)
    if cpu:
        def timed(fn):
            return _host_time_ms(fn, args["repeats"], before=group.barrier)
    else:
        from bench.device_probe import time_ms

        def timed(fn):
            return time_ms(fn, args["repeats"], warmup=2, before=sync)
    twins = {False: select_all_to_all("fixed", group, per_rank, hidden),  # the NCCL rows, to check symm against
             True: select_all_to_all("fixed", group, per_rank, hidden, fp8=True)}
    for kind in args["backends"]:
        a2a = None
        for t in args["tokens"]:
            try:
                if a2a is None:
                    a2a = (twins[kind == "fixed_fp8"] if kind in ("fixed", "fixed_fp8") else
                           _backend(kind, group, per_rank, hidden, top_k, max(args["tokens"])))
                rows.append(_measure(a2a, twins[getattr(a2a, "fp8", False)], rank, world, t, hidden, experts, top_k,
                                     per_rank, emap, dev, timed, sync, args["loop"]))
            except Exception as exc:  # one backend failing must not lose the others' figures
                group.barrier()
                rows.append(dict(backend=kind, rank=rank, tokens=t, error=repr(exc)[:300]))
            print(json.dumps(rows[-1]), flush=True)  # in the log even if a later backend hangs
            if not cpu:
                torch.cuda.empty_cache()
    rel = None if cpu else _ep_vs_one_gpu(group, rank, world, hidden, top_k, args["inter"], dev)
    queue.put(dict(rank=rank, rows=rows, rel_err=rel, nccl=None if cpu else torch.cuda.nccl.version()))
    queue.close()
    queue.join_thread()
    os._exit(0)  # skip process-group teardown (it can stall after NCCL graph capture)


def _ep_vs_one_gpu(group, rank, world, hidden, top_k, inter, dev) -> float:
    """Correctness at a reduced expert count: EP output (fixed backend) == all experts on this GPU."""
    from engine.ep.runtime import select_all_to_all
    from engine.eplb import ExpertMap, initial_placement
    from engine.kernels.fused_moe import fused_experts

    e_small = world * 8
    gen = torch.Generator(device=dev).manual_seed(7)  # same weights on every rank
    w13 = torch.randn(e_small, 2 * inter, hidden, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
    w2 = torch.randn(e_small, hidden, inter, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
    small = select_all_to_all("fixed", group, e_small // world, hidden)
    smap = ExpertMap(initial_placement(1, e_small, e_small, world), dev)
    gen = torch.Generator(device=dev).manual_seed(99 + rank)
    x = torch.randn(64, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    weights, ids = torch.randn(64, e_small, device=dev, generator=gen).softmax(-1).topk(top_k, dim=-1)
    local = slice(rank * (e_small // world), (rank + 1) * (e_small // world))
    sent = small.dispatch(x, smap.route(0, ids, rank), weights)
    ep_out = small.combine(fused_experts(sent.hidden, w13[local].contiguous(), w2[local].contiguous(),
                                         sent.topk_weights, sent.topk_ids), sent.handle)
    ref = fused_experts(x, w13, w2, weights, ids)
    return float((ep_out.float() - ref.float()).norm() / ref.float().norm())


def _measure(a2a, fixed, rank, world, t, hidden, experts, top_k, per_rank, emap, dev, timed, sync, loop) -> dict:
    from engine.ep.fixed_all_to_all import RowLayout

    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(1000 * rank + t)
    x = torch.randn(t, hidden, device=dev, dtype=dtype, generator=gen)
    logits = torch.randn(t, experts, device=dev, generator=gen)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    slots = emap.route(0, ids, replica_offset=rank)
    sent = a2a.dispatch(x, slots, weights)  # warm-up and the traffic count
    dest = slots // per_rank
    to_rank = torch.zeros(t, world, dtype=torch.bool, device=dev).scatter_(1, dest, True)
    remote_tokens = int(to_rank.sum()) - int(to_rank[:, rank].sum())
    partial = torch.randn(sent.hidden.shape, device=dev, generator=gen).to(dtype)
    combined = a2a.combine(partial, sent.handle)
    row = dict(backend=a2a.name, rank=rank, tokens=t, received=int(sent.hidden.shape[0]),
               remote_tokens=remote_tokens, dispatch_bytes_remote=remote_tokens * hidden * x.element_size())
    if hasattr(a2a, "start_dispatch"):  # fixed-size rows: what actually crosses to the other ranks
        lay = RowLayout(hidden, top_k, dtype, getattr(a2a, "fp8", False))
        row["wire_bytes_remote"] = (world - 1) * t * (lay.row_bytes + hidden * x.element_size())  # d + c
    if a2a is not fixed and a2a.name.startswith("symm"):  # the fixed rows over another transport: must be equal
        ref = fixed.dispatch(x, slots, weights)
        row["equals_fixed"] = bool(torch.equal(ref.hidden, sent.hidden) and torch.equal(ref.topk_ids, sent.topk_ids)
                                   and torch.equal(fixed.combine(partial, ref.handle), combined))
    row.update(dispatch_ms=timed(lambda: a2a.dispatch(x, slots, weights)),
               combine_ms=timed(lambda: a2a.combine(partial, sent.handle)),
               round_ms=timed(lambda: a2a.combine(partial, a2a.dispatch(x, slots, weights).handle)))
    if a2a.graph_safe and dev.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        sync()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            a2a.combine(partial, a2a.dispatch(x, slots, weights).handle)
        sync()
        row["graph_round_ms"] = timed(graph.replay)

        # Back to back, as a decode step's ~60 MoE layers run: `loop` replays after one barrier,
        # so the ranks' host skew at the start is paid once, not per round.
        def replays():
            for _ in range(loop):
                graph.replay()
        row["graph_loop_ms"] = timed(replays) / loop
    return row


def run(world: int, tokens: list[int], backends: list[str], hidden=7168, experts=256, top_k=8, inter=2048,
        repeats=20, loop=50, cpu=False, timeout_s=600) -> dict:
    from engine.ports import free_port

    bw = host_copy_bandwidth() if cpu else peer_copy_bandwidth()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    args = dict(hidden=hidden, experts=experts, top_k=top_k, inter=inter, tokens=tokens, repeats=repeats,
                backends=backends, loop=loop, cpu=cpu)
    procs = [ctx.Process(target=_worker, args=(r, world, init, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=timeout_s) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    table = [_summarise([r["rows"][i] for r in results], bw) for i in range(len(results[0]["rows"]))]
    return {"world": world, "peer_copy_bytes_per_s": bw, "nccl": results[0]["nccl"],
            "device": "cpu (gloo smoke run: no floor meaning)" if cpu else torch.cuda.get_device_name(0),
            "shape": dict(hidden=hidden, experts=experts, top_k=top_k), "rows": table,
            "ep_vs_single_gpu_rel_err": [r["rel_err"] for r in results]}


def _summarise(per_rank: list[dict], bw: float) -> dict:
    """One backend x token count over the ranks: the slowest rank's times against the copy floor.
    Floor = the worst rank's token bytes to other ranks (bf16 hidden, what the tokens need) / the
    GPU→GPU copy rate, one way; dispatch + combine move it twice. `achieved` = those 2 x bytes over
    the best dispatch + combine time; `wire` = the bytes the fixed rows really carry (padding,
    metadata, FP8 payload)."""
    errors = [x["error"] for x in per_rank if "error" in x]
    if errors:
        return dict(backend=per_rank[0]["backend"], tokens_per_rank=per_rank[0]["tokens"], error=errors[0])
    worst_bytes = max(x["dispatch_bytes_remote"] for x in per_rank)
    floor_ms = worst_bytes / bw * 1e3
    row = dict(backend=per_rank[0]["backend"], tokens_per_rank=per_rank[0]["tokens"],
               remote_bytes_worst_rank=worst_bytes, floor_ms=floor_ms, per_rank=per_rank)
    for key in ("dispatch_ms", "combine_ms", "round_ms", "graph_round_ms", "graph_loop_ms", "wire_bytes_remote"):
        if key in per_rank[0]:
            row[key] = max(x[key] for x in per_rank)
    row["dispatch_pct_of_floor"] = 100 * floor_ms / row["dispatch_ms"]
    row["combine_pct_of_floor"] = 100 * floor_ms / row["combine_ms"]
    if "equals_fixed" in per_rank[0]:
        row["equals_fixed"] = all(x["equals_fixed"] for x in per_rank)
    best = min(row[k] for k in ("round_ms", "graph_round_ms", "graph_loop_ms") if k in row)
    row["best_round_ms"] = best
    row["round_pct_of_floor"] = 100 * 2 * floor_ms / best
    row["achieved_bytes_per_s"] = 2 * worst_bytes / (best / 1e3)
    if "wire_bytes_remote" in row:
        row["wire_bytes_per_s"] = row["wire_bytes_remote"] / (best / 1e3)
    return row


def markdown(res: dict) -> str:
    rel = ", ".join("—" if e is None else f"{e:.1e}" for e in res["ep_vs_single_gpu_rel_err"])
    lines = [f"Device: {res['world']}× {res['device']} (NCCL {res['nccl']}); "
             f"GPU→GPU copy {res['peer_copy_bytes_per_s'] / 1e9:.0f} GB/s (same run) = the floor's rate.",
             f"Shape: {res['shape']}; EP output (fixed backend) vs all experts on one GPU: rel. err {rel}", "",
             "| backend | tokens / rank | remote MB (worst rank, bf16 tokens) | floor ms (one way) | dispatch ms | "
             "combine ms | d + c eager ms | d + c CUDA graph ms | d + c graph back-to-back ms | achieved GB/s "
             "(2 × tokens' bytes / best) | wire GB/s | % of floor (2 × one way / best) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(r, key):
        return f"{r[key]:.3f}" if key in r else "—"
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['tokens_per_rank']} | failed: {r['error']} ||||||||||")
            continue
        wire = f"{r['wire_bytes_per_s'] / 1e9:.0f}" if "wire_bytes_per_s" in r else "—"
        lines.append(f"| {r['backend']} | {r['tokens_per_rank']} | {r['remote_bytes_worst_rank'] / 1e6:.1f} | "
                     f"{r['floor_ms']:.4f} | {ms(r, 'dispatch_ms')} | {ms(r, 'combine_ms')} | {ms(r, 'round_ms')} | "
                     f"{ms(r, 'graph_round_ms')} | {ms(r, 'graph_loop_ms')} | {r['achieved_bytes_per_s'] / 1e9:.0f} | "
                     f"{wire} | {r['round_pct_of_floor']:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=None, help="ranks (default: every visible GPU; --cpu: 2)")
    ap.add_argument("--tokens", default="128,4096", help="tokens per rank, comma-separated")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--loop", type=int, default=50, help="graph replays back to back per timed repeat")
    ap.add_argument("--backends", default="fixed,fixed_fp8,symm,symm_fp8,torch",
                    help="all-to-all backends, comma-separated: fixed, symm (the fixed rows over symmetric "
                         "memory), torch, deepep; fixed_fp8 / symm_fp8: FP8 activations")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--cpu", action="store_true", help="smoke run on gloo CPU ranks (checks the script, no floor)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the ranks")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    world = args.world or (2 if args.cpu else torch.cuda.device_count())
    if world < 2:
        raise SystemExit("ep_bench needs at least 2 GPUs")
    res = run(world, [int(t) for t in args.tokens.split(",")], args.backends.split(","), hidden=args.hidden,
              experts=args.experts, top_k=args.top_k, repeats=args.repeats, loop=args.loop, cpu=args.cpu,
              timeout_s=args.timeout)
    emit(res, markdown(res), args.out, "ep_a2a")


if __name__ == "__main__":
    main()
