"""The KV transfer table of `pdserve profile`: seconds for a prefill engine to push `n` pages of
every layer into a decode engine's KV pool over NIXL, as the product's push issues them.

What one row measures (what `planner/link.py`'s `Channel.push_layers` spreads over the layers):
one WRITE per layer (`KVTransferAgent.write(layers=[i])`, the pages' contiguous runs coalesced
into one descriptor each, as `kvtransfer/nixl_connector.py` posts a step's layers), all layers
posted back to back, from the first post to the last DONE. The agents are created, registered and
connected before any timing, and one untimed round warms each size: a row is steady-state
bandwidth plus the per-WRITE cost (descriptor preparation, post, completion) of `num_layers` WRITEs.

The receiver is another process, as a decode node is: two agents in one process cannot use the
fast paths between processes (UCX's cuda_ipc on one GPU; an H200 run measured 0.48 GB/s
VRAM→VRAM in one process, against ~300 GB/s for the product's push between two). On one GPU both
pools are on that GPU (VRAM→VRAM, what a collocated P/D pair or NVLink peers approach); on CPU,
DRAM→DRAM.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import statistics
import time

import torch

from engine.kv_cache import KVPool
from kvtransfer.agent import page_runs

log = logging.getLogger(__name__)


def _receiver(spec, device: str, num_pages: int, conn) -> None:
    """The decode side: a KV pool and its agent; publishes its destination, then polls its
    notifications (DRAM agents progress only when polled) every millisecond until told to stop."""
    try:
        from kvtransfer.agent import KVTransferAgent

        pool = KVPool(spec, num_pages, torch.device(device))
        agent = KVTransferAgent("decode", pool.layers, spec.describe(), spec.page_bytes)
        conn.send(("ok", agent.destination()))
    except Exception as e:  # noqa: BLE001 — reported to the profiler, which then skips the table
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while not conn.poll(0.001):
        agent.notifications()


def _wait_all(agent, transfers: list, deadline: float) -> str:
    """DONE when every WRITE is; else ERR or TIMEOUT (the sender's poll drives progress)."""
    pending = list(transfers)
    while pending:
        if time.perf_counter() > deadline:
            return "TIMEOUT"
        state = agent.poll(pending[0])
        if state == "ERR":
            return "ERR"
        if state == "DONE":
            pending.pop(0)
    return "DONE"


def _push_seconds(agent, dest: dict, n: int, num_layers: int, tag: str, timeout_s: float) -> float | str:
    pages = list(range(n))
    d = dict(dest, page_ids=pages)
    runs = page_runs(pages, pages)  # once per push, as the connector does
    t0 = time.perf_counter()
    transfers = [agent.write(f"{tag}-l{layer}", pages, d, layers=[layer], runs=runs) for layer in range(num_layers)]
    state = _wait_all(agent, transfers, t0 + timeout_s)
    return time.perf_counter() - t0 if state == "DONE" else state


def measure_kv_transfer(spec, device: torch.device, page_counts: list[int], repeats: int,
                        timeout_s: float = 60.0, start_timeout_s: float = 300.0) -> dict | None:
    """The table `{"bytes", "seconds", "path"}` (median of `repeats` after one warm-up per size),
    or None when NIXL is missing or a transfer fails (the profile then has no KV table)."""
    try:
        from kvtransfer.agent import KVTransferAgent

        pool = KVPool(spec, max(page_counts), device)
        sender = KVTransferAgent("prefill", pool.layers, spec.describe(), spec.page_bytes)
    except Exception as e:  # noqa: BLE001 — no NIXL here: the profile simply has no KV table
        log.warning("KV transfer not measured: %s", e)
        return None
    ctx = mp.get_context("spawn")  # CUDA is initialised here already; a forked child could not use it
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(spec, str(device), max(page_counts), child_conn), daemon=True)
    proc.start()
    try:
        if not conn.poll(start_timeout_s):
            log.warning("KV transfer not measured: the receiving process did not start in %.0f s", start_timeout_s)
            return None
        status, dest = conn.recv()
        if status != "ok":
            log.warning("KV transfer not measured: receiver failed (%s)", dest)
            return None
        dest = dict(dest, incarnation="profile")
        rows = {"bytes": [], "seconds": [],
                "path": f"NIXL WRITE {sender.mem_type}→{sender.mem_type} between two processes on one "
                        f"{device.type} device; one WRITE per layer ({spec.num_layers}), one descriptor each, "
                        f"posted back to back; first post to last DONE"}
        for n in page_counts:
            times = []
            for i in range(repeats + 1):
                t = _push_seconds(sender, dest, n, spec.num_layers, f"kv{n}-{i}", timeout_s)
                if isinstance(t, str):
                    log.warning("KV transfer of %d pages did not complete (%s); not measured", n, t)
                    return None
                if i:  # the first round of each size warms it up (connection, registration caches)
                    times.append(t)
            rows["bytes"].append(n * spec.page_bytes * spec.num_layers)
            rows["seconds"].append(statistics.median(times))
        return rows
    except Exception as e:  # noqa: BLE001 — a NIXL failure costs the table, not the profile
        log.warning("KV transfer not measured: %s", e)
        return None
    finally:
        try:
            conn.send("stop")
        except OSError:
            pass
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
