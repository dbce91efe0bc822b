"""EP dispatch / combine times for a profile: one process per rank (NCCL on GPUs, gloo on CPU),
the engine's own all-to-all backend (`engine.ep.all_to_all.select_all_to_all`), the model's MoE
shape (hidden size, routed experts, top-k) with random routing. Per rank count and tokens per
rank: the slowest rank's median over repeats, timed between barriers. `bench/ep_bench.py` is the
stand-alone micro-benchmark (floors, correctness); this module only feeds the planner's tables.
"""
from __future__ import annotations

import queue as queue_mod
import statistics
import time

import torch
import torch.multiprocessing as mp

from engine.ports import free_port


def _timed(fn, repeats: int, group, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        group.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, world: int, init: str, shape: dict, tokens: list[int], repeats: int, device_type: str,
            queue) -> None:
    from engine.config import ParallelConfig
    from engine.ep.group import EPGroup
    from engine.ep.runtime import select_all_to_all
    from engine.eplb import ExpertMap, initial_placement

    dev = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    group = EPGroup(rank, world, init, dev)
    hidden, experts, top_k = shape["hidden"], shape["experts"], shape["top_k"]
    a2a = select_all_to_all(ParallelConfig(ep_size=world, ep_rank=rank).ep_backend, group, experts // world, hidden)
    emap = ExpertMap(initial_placement(1, experts, experts, world), dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for t in tokens:
        gen = torch.Generator(device=dev).manual_seed(1000 * rank + t)
        x = torch.randn(t, hidden, device=dev, dtype=dtype, generator=gen)
        weights, ids = torch.randn(t, experts, device=dev, generator=gen).softmax(-1).topk(top_k, dim=-1)
        slots = emap.route(0, ids, replica_offset=rank)
        sent = a2a.dispatch(x, slots, weights)
        partial = torch.zeros_like(sent.hidden)
        rows.append((_timed(lambda: a2a.dispatch(x, slots, weights), repeats, group, dev),
                     _timed(lambda: a2a.combine(partial, sent.handle), repeats, group, dev)))
    queue.put((rank, rows))
    group.close()


def _one_world(world: int, tokens: list[int], shape: dict, device_type: str, repeats: int) -> list[tuple[float, float]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_worker, args=(r, world, init, shape, tokens, repeats, device_type, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = []
    deadline = time.monotonic() + 900
    while len(results) < len(procs):  # a rank that died (bad import, OOM) must not leave us waiting
        try:
            results.append(queue.get(timeout=1.0))
        except queue_mod.Empty:
            dead = [p for p in procs if not p.is_alive() and p.exitcode != 0]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"EP all-to-all profile: rank process exited with code {dead[0].exitcode}"
                                   if dead else "EP all-to-all profile: ranks did not report within 900 s")
    for p in procs:
        p.join(60)
    # Lock-step ranks: a step waits for the slowest one.
    return [(max(r[1][i][0] for r in results), max(r[1][i][1] for r in results)) for i in range(len(tokens))]


def measure_all_to_all(ranks: list[int], tokens: list[int], model_config, device_type: str, repeats: int = 5) -> dict:
    hf = model_config.hf
    experts = hf.get("n_routed_experts") or hf.get("num_experts")
    shape = {"hidden": hf["hidden_size"], "experts": experts, "top_k": hf["num_experts_per_tok"]}
    ranks = [r for r in ranks if experts % r == 0]
    table = {r: _one_world(r, tokens, shape, device_type, repeats) for r in ranks}
    return {"ranks": ranks, "tokens": tokens, "shape": shape,
            "dispatch_seconds": [[table[r][i][0] for i in range(len(tokens))] for r in ranks],
            "combine_seconds": [[table[r][i][1] for i in range(len(tokens))] for r in ranks]}
