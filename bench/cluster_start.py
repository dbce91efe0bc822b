"""Seconds from `pdserve up` to a cluster that serves: the launcher's own start, each node's engine
and NIXL agent, the router finding the nodes. Each repeat starts a fresh cluster on loopback (the
test suite's tiny-llama settings by default), times its "gRPC Generate on" line and one request's
answer, then stops it with SIGTERM.

    python -m bench.cluster_start --repeats 3 [--out bench/results/DIR]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

import grpc

from engine.ports import free_port
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc

from bench.record import emit

ENGINE = ["--model", "tiny-llama", "--load-format", "dummy", "--page-size", "4", "--num-pages", "128",
          "--max-model-len", "96"]


def start_once(extra: list[str]) -> dict:
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "up", *ENGINE, "--grpc-port", str(port),
                             "--http-port", str(free_port()), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "pdserve up: gRPC Generate on" in line:
                break
        else:
            raise RuntimeError("the cluster exited before serving")
        ready = time.monotonic() - t0
        stub = pb_grpc.GenerateStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                              sampling=pb.SamplingParams(max_tokens=2, ignore_eos=True)), timeout=60))
        return {"ready_s": ready, "first_answer_s": time.monotonic() - t0}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("extra", nargs="*", help="more `pdserve up` flags")
    args = ap.parse_args(argv)
    runs = [start_once(args.extra) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("ready_s", "first_answer_s")}
    md = ("| repeat | ready (s) | first answer (s) |\n|---|---:|---:|\n"
          + "".join(f"| {i} | {r['ready_s']:.2f} | {r['first_answer_s']:.2f} |\n" for i, r in enumerate(runs))
          + f"| median | {med['ready_s']:.2f} | {med['first_answer_s']:.2f} |\n")
    emit({"runs": runs, "median": med, "command": " ".join(sys.argv)}, md, args.out, "cluster_start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
