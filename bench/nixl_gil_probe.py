"""Whether NIXL's Python calls let other threads run while they work (release the GIL): a thread
makes the peer's connection, then each call of a KV push's WRITE (descriptor lists, initialize_xfer,
transfer) over many small descriptors between two agents in this process (UCX, DRAM), while the main
thread counts loop iterations; the count's rate against the main thread's rate alone is printed per
call. 0% means the call held the GIL throughout. CPU only; the device's nixl-cu13 wheel has the same
bindings. On this machine (2026-12-08) the connection took 12 ms with the main thread at 34% of its rate.

    python -m bench.nixl_gil_probe [--pages 40000]
"""
from __future__ import annotations

import argparse
import threading
import time


def _loop_rate(seconds: float = 0.3) -> float:
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
    return n / seconds


def _measure(label: str, fn, rate: float):
    res = {}

    def run():
        t = time.perf_counter()
        res["out"] = fn()
        res["s"] = time.perf_counter() - t
    th, n = threading.Thread(target=run), 0
    t0 = time.perf_counter()
    th.start()
    while th.is_alive():
        n += 1
    span = time.perf_counter() - t0
    print(f"{label}: {res['s'] * 1e3:.1f} ms in the call; the main thread ran at {n / span / rate:.0%} of its rate alone")
    return res["out"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=40000, help="pages per pool; every other page is sent")
    args = ap.parse_args(argv)
    from tests.kvtransfer.test_agent import _agent
    a, _ = _agent("prefill", pages=args.pages, page_size=4)
    b, _ = _agent("decode", pages=args.pages, page_size=4)
    dest = b.destination()
    rate = _loop_rate()
    # the peer's connection (NIXL's add_remote_agent; since 2026-12-08 on the prefill node's connect thread):
    # whether it lets the engine loop's Python run meanwhile
    remote = _measure("connect (add_remote_agent)", lambda: a.connect(dest), rate)
    src, dst = [], []
    for layer in range(len(a.layer_addrs)):
        for p in range(0, args.pages, 2):  # scattered pages: one descriptor each
            src.append((a.layer_addrs[layer] + p * a.page_bytes, a.page_bytes, a.dev_id))
            dst.append((dest["layer_addrs"][layer] + p * a.page_bytes, a.page_bytes, 0))
    print(f"{len(src)} descriptors")
    sd = _measure("get_xfer_descs (local)", lambda: a.agent.get_xfer_descs(src, a.mem_type), rate)
    dd = _measure("get_xfer_descs (remote)", lambda: a.agent.get_xfer_descs(dst, a.mem_type), rate)
    handle = _measure("initialize_xfer", lambda: a.agent.initialize_xfer("WRITE", sd, dd, remote, b""), rate)
    _measure("transfer", lambda: a.agent.transfer(handle), rate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
