"""The fixed latency of the serving path, for a profile: what an idle `pdserve up` cluster adds to
a request's first token beyond the engine's own prefill step (HTTP/gRPC hops, the router's KV
reservation, the prefill RPC and its completion notice). It starts the cluster as a user does (a
`pdserve up` subprocess), sends prompts one at a time through the router's gRPC `Generate` API,
and subtracts the profiled prefill time of each prompt from its TTFT. The simulator delays each
request's arrival at the nodes by it. Also the TPOT of one request alone through the cluster.

`python -m planner.serving_probe --grpc HOST:PORT --profile P.json --mode disaggregated` probes a
cluster that is already up and idle (one cluster start serves the probe and a later benchmark) and
writes the overhead into the profile file.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(stub, ids: list[int], max_tokens: int = 4) -> tuple[float, float | None]:
    """TTFT and TPOT (None for fewer than two tokens) of one request, seconds."""
    msg = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    msg.token_ids.ids.extend(ids)
    t0 = time.perf_counter()
    first, last, n = None, None, 0
    for delta in stub.Generate(msg, timeout=300):
        if delta.token_ids:
            now = time.perf_counter()
            first = now - t0 if first is None else first
            last, n = now - t0, n + len(delta.token_ids)
        if delta.finished:
            if delta.finish_reason == "error":
                raise RuntimeError(f"probe request failed: {delta.error}")
            break
    return first, ((last - first) / (n - 1) if n > 1 else None)


def _ttft(stub, ids: list[int], max_tokens: int = 4) -> float:
    return _timed(stub, ids, max_tokens)[0]


def _prompt(i: int, n: int) -> list[int]:
    """The probe's `i`-th prompt of `n` tokens: random tokens (as `pdserve bench`'s random dataset sends),
    drawn from a generator seeded by both `i` and `n`, so no prompt shares a prefix with another, of
    its own length or any other. A shared prefix would be a prefix-cache hit on the server, and a step
    over a cached prefix is not the profile's fresh prefill: until 2026-12-08 the `i`-th 256-token prompt
    was the start of the `i`-th 2,048-token one, and the 2k requests, prefilled over 256 cached tokens
    on the eager path instead of the prefill graphs, measured 35 ms more than HTTP's random prompts."""
    gen = random.Random(f"serving-probe/{n}/{i}")
    return [gen.randrange(100, 30100) for _ in range(n)]


def probe(stub, prompt_lens: list[int], prefill_time, repeats: int, max_tokens: int = 4) -> dict:
    """On an idle cluster, after one untimed request per prompt length: median TTFT minus
    `prefill_time(len)` over prompts and repeats, and the median TPOT of these requests (one at a time,
    so batch 1), seconds."""
    # Warm-up, two requests per length: a length's first request paid a Triton compile (0.4 s) and its
    # next two still ran 25 ms slow (H100, 12-07m). The warm-up prompts are as varied as the timed ones
    # (no prefix of them): a prompt of one repeated token routes every token of an MoE model to the same
    # few experts, so it leaves the grouped GEMM's many-expert shapes and their buffers cold.
    for n in prompt_lens:
        for i in range(repeats, repeats + 2):
            _ttft(stub, _prompt(i, n))
    over, tpot, by_prompt, raw = [], [], [], []
    for n in prompt_lens:
        here, pre = [], prefill_time(n)
        for i in range(repeats):
            ids = _prompt(i, n)
            ttft, t = _timed(stub, ids, max_tokens)
            here.append(ttft - pre)
            raw.append([n, ttft, pre])
            if t is not None:
                tpot.append(t)
        over += here
        by_prompt.append([n, max(0.0, statistics.median(here))])
    return {"overhead_s": max(0.0, statistics.median(over)), "overhead_by_prompt_s": by_prompt,
            "tpot_batch1_s": statistics.median(tpot) if tpot else None, "samples": len(over),
            "ttft_samples": raw}  # [prompt tokens, TTFT s, profiled prefill s] per request, in order


def measure(*args, attempts: int = 2, **kw) -> tuple[float, list]:
    """`_measure_once`, started afresh once more if the cluster fails to come up (a port taken by
    another process between choosing and binding it)."""
    for attempt in range(attempts):
        try:
            return _measure_once(*args, **kw)
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _measure_once(model: str, dtype: str, device: str, prompt_lens: list[int], prefill_time, num_prefill: int,
            repeats: int = 5, gpu_memory_utilization: float = 0.4, timeout_s: float = 900.0,
            extra_argv: list[str] = ()) -> tuple[float, list]:
    """Median over prompts and repeats of TTFT minus `prefill_time(len)` on an idle cluster with
    `num_prefill` prefill nodes (0: one collocated node) and one decode node, and that per prompt length
    (`[[len, s], ...]`)."""
    port = _free_port()
    argv = [sys.executable, "-m", "deploy.cli", "up", "--model", model, "--load-format", "dummy", "--dtype", dtype,
            "--device", device, "--num-prefill", str(num_prefill), "--num-decode", "1", "--grpc-port", str(port),
            "--http-port", str(_free_port()), "--max-model-len", str(max(prompt_lens) + 64),
            "--gpu-memory-utilization", str(gpu_memory_utilization), *extra_argv]
    # The cluster's log goes to a file: a pipe nobody drains would fill and stall its processes.
    log = tempfile.NamedTemporaryFile("w+", prefix="pdserve-probe-", suffix=".log", delete=False)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.time() + timeout_s
        while "pdserve up: gRPC" not in open(log.name).read():
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"`pdserve up` did not come up; its log: {log.name}")
            time.sleep(0.5)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.GenerateStub(ch)
            res = probe(stub, prompt_lens, prefill_time, repeats)
            return res["overhead_s"], res["overhead_by_prompt_s"]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="probe an idle running cluster; write its serving overhead into a profile")
    ap.add_argument("--grpc", required=True, help="the router's gRPC address")
    ap.add_argument("--profile", required=True, help="profile JSON (read for prefill times, updated in place)")
    ap.add_argument("--mode", choices=["disaggregated", "collocated"], default="disaggregated")
    ap.add_argument("--prompts", default="256,2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per probe request (its TPOT is batch 1)")
    ap.add_argument("--out", default=None, help="also write the probe's numbers here (JSON)")
    args = ap.parse_args(argv)
    from planner.profile import Profile
    prof = Profile.load(args.profile)
    lens = sorted({int(x) for x in args.prompts.split(",")})
    with grpc.insecure_channel(args.grpc) as ch:
        res = probe(pb_grpc.GenerateStub(ch), lens, prof.prefill_time, args.repeats, args.max_tokens)
    prof.serving_overhead[args.mode] = res["overhead_s"]
    prof.serving_overhead_by_prompt[args.mode] = res["overhead_by_prompt_s"]
    prof.notes.setdefault("serving_probe", {})[args.mode] = dict(res, prompts=lens, grpc=args.grpc)
    prof.save(args.profile)
    res.update(mode=args.mode, prompts=lens, engine_decode_batch1_s=prof.decode_time(1, prof.decode["context"][0]))
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
