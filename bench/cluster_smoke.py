"""Concurrent gRPC `Generate` load against a running router: per-request TTFT and TPOT from the
streamed deltas, finish reasons, and throughput. A small precursor of the serving benchmark.

    python -m bench.cluster_smoke --grpc 127.0.0.1:50051 --num-requests 16 --prompt-len 1024 --max-tokens 64
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import statistics
import sys
import time

import grpc

from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc


def one(stub, ids: list[int], max_tokens: int) -> dict:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                             sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    t0 = time.perf_counter()
    times, n, last = [], 0, None
    for d in stub.Generate(req, timeout=600):
        if d.token_ids:
            times.append(time.perf_counter())
            n += len(d.token_ids)
        last = d
    ttft = times[0] - t0 if times else float("nan")
    tpot = (times[-1] - times[0]) / (n - 1) if n > 1 else float("nan")
    return {"ttft_s": ttft, "tpot_s": tpot, "tokens": n, "finish_reason": last.finish_reason, "error": last.error,
            "e2e_s": time.perf_counter() - t0}


def _pct(xs, q):
    xs = sorted(x for x in xs if x == x)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grpc", default="127.0.0.1:50051")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=100000)
    args = ap.parse_args(argv)
    stub = pb_grpc.GenerateStub(grpc.insecure_channel(args.grpc))
    rng = random.Random(0)
    prompts = [[rng.randrange(args.vocab) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(args.num_requests) as pool:
        rows = list(pool.map(lambda p: one(stub, p, args.max_tokens), prompts))
    wall = time.perf_counter() - t0
    summary = {
        "requests": len(rows), "finish_reasons": {r: sum(x["finish_reason"] == r for x in rows)
                                                 for r in {x["finish_reason"] for x in rows}},
        "errors": sorted({x["error"] for x in rows if x["error"]}),
        "ttft_ms_p50": 1e3 * _pct([x["ttft_s"] for x in rows], 0.5),
        "ttft_ms_p90": 1e3 * _pct([x["ttft_s"] for x in rows], 0.9),
        "tpot_ms_p50": 1e3 * _pct([x["tpot_s"] for x in rows], 0.5),
        "tpot_ms_p90": 1e3 * _pct([x["tpot_s"] for x in rows], 0.9),
        "output_tok_s": sum(x["tokens"] for x in rows) / wall, "wall_s": wall,
        "mean_e2e_s": statistics.mean(x["e2e_s"] for x in rows)}
    print(json.dumps(summary, indent=1))
    return 0 if all(x["finish_reason"] == "length" for x in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
