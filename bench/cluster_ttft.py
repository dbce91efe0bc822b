"""TTFT of one request at a time through `pdserve up` (router -> prefill -> decode over NIXL), for
before/after comparisons of the request path on the same machine. Starts the cluster from a
source tree (default: this one), sends `--num-requests` requests sequentially over gRPC and prints
the TTFT / end-to-end percentiles as JSON.

    python -m bench.cluster_ttft --tree /path/to/checkout --num-requests 40
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import grpc

from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc


def _start(tree: str, port: int, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "up", "--grpc-port", str(port),
                             "--http-port", str(port + 1), *extra], cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if "pdserve up:" in line:
            return proc
        if time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("cluster did not start")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", default=os.getcwd())
    ap.add_argument("--port", type=int, default=23400)
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=4)
    args, extra = ap.parse_known_args(argv)
    proc = _start(args.tree, args.port, extra)
    try:
        stub = pb_grpc.GenerateStub(grpc.insecure_channel(f"127.0.0.1:{args.port}"))
        rng = random.Random(0)
        ttft, e2e = [], []
        for i in range(args.num_requests + 3):  # the first 3 warm up
            ids = [rng.randrange(3, 30000) for _ in range(args.prompt_len)]
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                     sampling=pb.SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
            t0 = time.perf_counter()
            first = None
            for d in stub.Generate(req, timeout=120):
                if d.token_ids and first is None:
                    first = time.perf_counter() - t0
                assert not d.error, d.error
            if i >= 3:
                ttft.append(first)
                e2e.append(time.perf_counter() - t0)
        ttft.sort()
        e2e.sort()
        pick = lambda xs, q: 1e3 * xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
        print(json.dumps({"tree": args.tree, "requests": len(ttft), "ttft_ms_p50": pick(ttft, 0.5),
                          "ttft_ms_p90": pick(ttft, 0.9), "e2e_ms_p50": pick(e2e, 0.5)}))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
