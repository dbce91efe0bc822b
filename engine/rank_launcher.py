"""Starting an engine's processes: one per EP rank on this host (one in all without EP), each
with its config placed on its own device, and waiting until every rank reports ready. A rank
that fails or exits during start-up stops them all with an error naming it.

It only spawns and waits; talking to running ranks is `engine_client.py`'s, and what runs
inside each process is `engine_process.py`'s.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import time
from dataclasses import replace

from engine.config import EngineConfig
from engine.engine_process import EngineFailed, EngineReady, run_engine_process
from engine.ports import free_port


def rank_device(device: str, rank: int) -> str:
    """EP rank `rank`'s device: GPU base+rank for cuda/cuda:N/auto-with-CUDA, else the CPU."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    base = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    return f"cuda:{base + rank}"


def rank_configs(config: EngineConfig) -> list[EngineConfig]:
    """The config of each EP rank on this host (the one config as it is without EP)."""
    par = config.parallel
    if par.ep_size == 1:
        return [config]
    init = f"tcp://{par.ep_master}" if par.ep_master else f"tcp://127.0.0.1:{free_port()}"
    return [replace(config, device=rank_device(config.device, r),
                    parallel=replace(par, ep_rank=par.ep_rank_offset + r, dist_init_method=init))
            for r in range(par.ep_local_size)]


def start_ranks(configs: list[EngineConfig], in_addrs: list[str], out_addr: str) -> list[mp.Process]:
    """Spawn one engine process per config, reading `in_addrs[r]` and answering on `out_addr`."""
    procs = [mp.get_context("spawn").Process(
        target=run_engine_process, args=(cfg, addr, out_addr), daemon=True, name=f"pdserve-engine{r}")
        for r, (cfg, addr) in enumerate(zip(configs, in_addrs))]
    for proc in procs:
        proc.start()
    return procs


def wait_ready(out, procs: list[mp.Process], rank_offset: int, timeout_s: float) -> list[EngineReady]:
    """Each rank's `EngineReady` from the output socket `out`, in rank order. On a failure, an
    early exit or the timeout every process is killed and RuntimeError says which."""
    deadline = time.monotonic() + timeout_s
    ready: dict[int, EngineReady] = {}
    try:
        while time.monotonic() < deadline:
            if out.poll(200):
                msg = pickle.loads(out.recv())
                if isinstance(msg, EngineFailed):
                    raise RuntimeError(f"engine failed to start: {msg.message}")
                ready[msg.rank - rank_offset] = msg
                if len(ready) == len(procs):
                    return [ready[r] for r in range(len(procs))]
                continue
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                raise RuntimeError(f"engine process {dead[0].name} exited during start-up "
                                   f"(exit code {dead[0].exitcode})")
        raise RuntimeError(f"engine did not become ready within {timeout_s:.0f} s "
                           f"({len(ready)} of {len(procs)} ranks ready)")
    except RuntimeError:
        for p in procs:
            p.kill()
            p.join(5)
        raise
