"""EP dispatch / combine across the GPUs of one host, for each all-to-all backend that loads.

One process per GPU (NCCL), DeepSeek-V3's MoE shape by default (hidden 7168, 256 routed experts
split evenly over the ranks, top-8 from random router logits). Per rank and step it times, with
CUDA events between barriers (median of repeats):

* dispatch: each token sent once to every rank owning one of its experts (+ ids and weights);
* combine: the per-rank partial sums sent back and added up;
* for graph-safe backends (`fixed`, the engine's default), dispatch + combine captured in one
  CUDA graph and replayed, as a decode step runs them. The count-based `torch` backend is timed
  eagerly for comparison.

Floor: the bytes a rank sends to *other* ranks (the slowest rank's) over the GPU→GPU copy
bandwidth measured in the same run between two GPUs (a `copy_` from cuda:0 to cuda:1). It also
checks, at a reduced expert count, that the expert-parallel MoE output equals the one-GPU output.
`python -m bench.ep_bench --out DIR` prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

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


def _worker(rank: int, world: int, init: str, args: dict, queue) -> None:
    from bench.device_probe import time_ms
    from engine.ep.runtime import select_all_to_all
    from engine.ep.group import EPGroup
    from engine.eplb import ExpertMap, initial_placement
    from engine.kernels.fused_moe import fused_experts

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    group = EPGroup(rank, world, init, dev)
    hidden, experts, top_k = args["hidden"], args["experts"], args["top_k"]
    per_rank = experts // world
    emap = ExpertMap(initial_placement(1, experts, experts, world), dev)
    rows = []

    def timed(fn):
        return time_ms(fn, args["repeats"], warmup=2, before=lambda: (group.barrier(), torch.cuda.synchronize(dev)))
    fixed = select_all_to_all("fixed", group, per_rank, hidden)
    for kind in args["backends"]:
        a2a = None
        for t in args["tokens"]:
            try:
                if a2a is None:
                    a2a = (fixed if kind == "fixed" else
                           SymmetricMemoryAllToAll(group, per_rank, max(args["tokens"]) * (hidden * 2 + 16 * top_k))
                           if kind == "symm" else select_all_to_all(kind, group, per_rank, hidden))
                rows.append(_measure(a2a, fixed, rank, world, t, hidden, experts, top_k, per_rank, emap, dev, timed))
            except Exception as exc:  # one backend failing must not lose the others' figures
                group.barrier()
                rows.append(dict(backend=kind, rank=rank, tokens=t, error=repr(exc)[:300]))
            print(json.dumps(rows[-1]), flush=True)  # in the log even if a later backend hangs
            torch.cuda.empty_cache()
    # Correctness at a reduced expert count: EP output == all experts on this GPU.
    e_small = world * 8
    gen = torch.Generator(device=dev).manual_seed(7)  # same weights on every rank
    w13 = torch.randn(e_small, 2 * args["inter"], hidden, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
    w2 = torch.randn(e_small, hidden, args["inter"], device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
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
    rel = float((ep_out.float() - ref.float()).norm() / ref.float().norm())
    queue.put(dict(rank=rank, rows=rows, rel_err=rel, nccl=torch.cuda.nccl.version()))
    queue.close()
    queue.join_thread()
    os._exit(0)  # skip process-group teardown (it can stall after NCCL graph capture)


def _measure(a2a, fixed, rank, world, t, hidden, experts, top_k, per_rank, emap, dev, timed) -> dict:
    gen = torch.Generator(device=dev).manual_seed(1000 * rank + t)
    x = torch.randn(t, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(t, experts, device=dev, generator=gen)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    slots = emap.route(0, ids, replica_offset=rank)
    sent = a2a.dispatch(x, slots, weights)  # warm-up and the traffic count
    dest = slots // per_rank
    to_rank = torch.zeros(t, world, dtype=torch.bool, device=dev).scatter_(1, dest, True)
    remote_tokens = int(to_rank.sum()) - int(to_rank[:, rank].sum())
    partial = torch.randn(sent.hidden.shape, device=dev, generator=gen).to(sent.hidden.dtype)
    combined = a2a.combine(partial, sent.handle)
    row = dict(backend=a2a.name, rank=rank, tokens=t, received=int(sent.hidden.shape[0]),
               remote_tokens=remote_tokens, dispatch_bytes_remote=remote_tokens * hidden * 2)
    if a2a is not fixed and a2a.name != "torch":  # same layout as the fixed backend: results must be equal
        ref = fixed.dispatch(x, slots, weights)
        row["equals_fixed"] = bool(torch.equal(ref.hidden, sent.hidden) and torch.equal(ref.topk_ids, sent.topk_ids)
                                   and torch.equal(fixed.combine(partial, ref.handle), combined))
    row.update(dispatch_ms=timed(lambda: a2a.dispatch(x, slots, weights)),
               combine_ms=timed(lambda: a2a.combine(partial, sent.handle)),
               round_ms=timed(lambda: a2a.combine(partial, a2a.dispatch(x, slots, weights).handle)))
    if a2a.graph_safe:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(dev)
        a2a.group.barrier()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            a2a.combine(partial, a2a.dispatch(x, slots, weights).handle)
        torch.cuda.synchronize(dev)
        row["graph_round_ms"] = timed(graph.replay)
    return row


class SymmetricMemoryAllToAll:
    """Bench-only candidate: the fixed-capacity layout moved by peer copies into symmetric memory
    (`torch.distributed._symmetric_memory`) between two device barriers, instead of NCCL. Measured
    here to see whether it beats NCCL's all-to-all at decode sizes before the engine adopts it."""

    def __new__(cls, group, slots_per_rank, max_block_bytes):
        import torch.distributed._symmetric_memory as symm_mem

        from engine.ep.fixed_all_to_all import FixedCapacityAllToAll

        class _Symm(FixedCapacityAllToAll):
            name = "symm"

            def _all_to_all(self, recv, send):
                world, me = self.group.size, self.group.rank
                block = send[0].numel() * send.element_size()
                self.handle.barrier(channel=0)  # every peer has read the previous exchange
                for r in range(world):
                    peer = self.handle.get_buffer(r, (block,), torch.uint8, me * block)
                    peer.copy_(send[r].reshape(-1).view(torch.uint8))
                self.handle.barrier(channel=0)  # every peer's block has landed here
                recv.view(-1).view(torch.uint8).copy_(self.buffer[: world * block])
                return None

        a2a = _Symm(group, slots_per_rank)
        name = group.group.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(name)
        a2a.buffer = symm_mem.empty(group.size * max_block_bytes, dtype=torch.uint8, device=group.device)
        a2a.handle = symm_mem.rendezvous(a2a.buffer, name)
        return a2a


def run(world: int, tokens: list[int], backends: list[str], hidden=7168, experts=256, top_k=8, inter=2048,
        repeats=20) -> dict:
    from engine.ports import free_port

    bw = peer_copy_bandwidth()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    args = dict(hidden=hidden, experts=experts, top_k=top_k, inter=inter, tokens=tokens, repeats=repeats,
                backends=backends)
    procs = [ctx.Process(target=_worker, args=(r, world, init, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=600) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    table = []
    for i in range(len(results[0]["rows"])):
        per_rank = [r["rows"][i] for r in results]
        errors = [x["error"] for x in per_rank if "error" in x]
        if errors:
            table.append(dict(backend=per_rank[0]["backend"], tokens_per_rank=per_rank[0]["tokens"], error=errors[0]))
            continue
        worst_bytes = max(x["dispatch_bytes_remote"] for x in per_rank)
        floor_ms = worst_bytes / bw * 1e3  # one direction; dispatch + combine move it twice
        row = dict(backend=per_rank[0]["backend"], tokens_per_rank=per_rank[0]["tokens"],
                   remote_bytes_worst_rank=worst_bytes, floor_ms=floor_ms, per_rank=per_rank)
        for key in ("dispatch_ms", "combine_ms", "round_ms", "graph_round_ms"):
            if key in per_rank[0]:
                row[key] = max(x[key] for x in per_rank)
        row["dispatch_pct_of_floor"] = 100 * floor_ms / row["dispatch_ms"]
        row["combine_pct_of_floor"] = 100 * floor_ms / row["combine_ms"]
        if "equals_fixed" in per_rank[0]:
            row["equals_fixed"] = all(x["equals_fixed"] for x in per_rank)
        best = row.get("graph_round_ms", row["round_ms"])
        row["round_pct_of_floor"] = 100 * 2 * floor_ms / best
        table.append(row)
    return {"world": world, "peer_copy_bytes_per_s": bw, "nccl": results[0]["nccl"],
            "device": torch.cuda.get_device_name(0), "shape": dict(hidden=hidden, experts=experts, top_k=top_k),
            "rows": table, "ep_vs_single_gpu_rel_err": [r["rel_err"] for r in results]}


def markdown(res: dict) -> str:
    lines = [f"Device: {res['world']}× {res['device']} (NCCL {res['nccl']}); "
             f"GPU→GPU copy {res['peer_copy_bytes_per_s'] / 1e9:.0f} GB/s (same run).",
             f"Shape: {res['shape']}; EP output (fixed backend) vs all experts on one GPU: rel. err "
             + ", ".join(f"{e:.1e}" for e in res["ep_vs_single_gpu_rel_err"]), "",
             "| backend | tokens / rank | remote MB (worst rank) | floor ms (one way) | dispatch ms | combine ms | "
             "dispatch + combine ms (eager) | in a CUDA graph | % of floor (2 × one way) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['tokens_per_rank']} | failed: {r['error']} |||||||")
            continue
        graph = f"{r['graph_round_ms']:.3f}" if "graph_round_ms" in r else "—"
        lines.append(f"| {r['backend']} | {r['tokens_per_rank']} | {r['remote_bytes_worst_rank'] / 1e6:.1f} | "
                     f"{r['floor_ms']:.3f} | {r['dispatch_ms']:.3f} | {r['combine_ms']:.3f} | {r['round_ms']:.3f} | "
                     f"{graph} | {r['round_pct_of_floor']:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=None, help="ranks (default: every visible GPU)")
    ap.add_argument("--tokens", default="128,4096", help="tokens per rank, comma-separated")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--backends", default="fixed,torch,symm",
                    help="all-to-all backends, comma-separated (symm: the bench-only symmetric-memory candidate)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    world = args.world or torch.cuda.device_count()
    if world < 2:
        raise SystemExit("ep_bench needs at least 2 GPUs")
    res = run(world, [int(t) for t in args.tokens.split(",")], args.backends.split(","), repeats=args.repeats)
    emit(res, markdown(res), args.out, "ep_a2a")


if __name__ == "__main__":
    main()
