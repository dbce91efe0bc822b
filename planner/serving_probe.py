"""The fixed latency of the serving path, for a profile: what an idle `pdserve up` cluster adds to
a request's first token beyond the engine's own prefill step (HTTP/gRPC hops, the router's KV
reservation, the prefill RPC and its completion notice). It starts the cluster as a user does (a
`pdserve up` subprocess), sends prompts one at a time through the router's gRPC `Generate` API,
and subtracts the profiled prefill time of each prompt from its TTFT. The simulator delays each
request's arrival at the nodes by it.
"""
from __future__ import annotations

import os
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


def _ttft(stub, ids: list[int], max_tokens: int = 4) -> float:
    msg = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    msg.token_ids.ids.extend(ids)
    t0 = time.perf_counter()
    first = None
    for delta in stub.Generate(msg, timeout=300):
        if delta.token_ids and first is None:
            first = time.perf_counter() - t0
        if delta.finished:
            if delta.finish_reason == "error":
                raise RuntimeError(f"probe request failed: {delta.error}")
            break
    return first


def measure(*args, attempts: int = 2, **kw) -> float:
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
            extra_argv: list[str] = ()) -> float:
    """Median over prompts and repeats of TTFT minus `prefill_time(len)` on an idle cluster with
    `num_prefill` prefill nodes (0: one collocated node) and one decode node."""
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
            _ttft(stub, [101] * prompt_lens[0])  # warm-up: first-request compiles
            over = []
            for n in prompt_lens:
                for i in range(repeats):
                    ids = [(i * 977 + k * 31) % 30000 + 100 for k in range(n)]
                    over.append(_ttft(stub, ids) - prefill_time(n))
        return max(0.0, statistics.median(over))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)
