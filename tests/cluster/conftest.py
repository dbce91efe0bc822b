"""A real local cluster for the tests: `pdserve up` as a subprocess on loopback (router + prefill +
decode processes, gRPC and NIXL over UCX in DRAM), torn down with SIGTERM, leaving no process."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from engine.ports import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc

ENGINE_ARGS = ["--model", "tiny-llama", "--load-format", "dummy", "--page-size", "4", "--num-pages", "128",
               "--max-model-len", "96"]
OFFLINE_KW = dict(load_format="dummy", page_size=4, num_pages=128, max_model_len=96)


class Cluster:
    def __init__(self, num_prefill=1, num_decode=1, extra=(), env=None):
        self.grpc_port, self.http_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "up", *ENGINE_ARGS, "--num-prefill", str(num_prefill),
             "--num-decode", str(num_decode), "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env=dict(os.environ, **(env or {})))
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if not self.ready.wait(180):
            self.stop()
            raise RuntimeError("cluster did not start:\n" + "".join(self.lines[-40:]))
        line = next(x for x in self.lines if "pdserve up: gRPC" in x)
        self.pids = {k: int(v) for k, v in re.findall(r"(\w+\d|router)=(\d+)", line)}
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.stub = pb_grpc.GenerateStub(self.channel)
        self.http = f"http://127.0.0.1:{self.http_port}/v1"

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "pdserve up: gRPC" in line:
                self.ready.set()

    def generate(self, ids=None, text=None, timeout=120, **sampling):
        sampling.setdefault("ignore_eos", True)
        req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
        if text is not None:
            req.text = text
        else:
            req.token_ids.ids.extend(ids)
        deltas = list(self.stub.Generate(req, timeout=timeout))
        return [t for d in deltas for t in d.token_ids], deltas[-1]

    def descendants(self) -> list[int]:
        out = subprocess.run(["ps", "-e", "-o", "pid=,pgid="], capture_output=True, text=True).stdout.split("\n")
        groups = set(self.pids.values()) | {self.proc.pid}
        return [int(p) for p, g in (line.split() for line in out if line.strip()) if int(g) in groups]

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Proc:
    """One pdserve component (or server) in its own process group, with its output kept."""

    def __init__(self, argv: list[str], ready_text: str | None, timeout: float = 120.0):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, cwd=REPO)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.ready_text = ready_text
        threading.Thread(target=self._pump, daemon=True).start()
        if ready_text is not None and not self.ready.wait(timeout):
            self.kill()
            raise RuntimeError(f"{argv[:4]} did not start:\n" + "".join(self.lines[-30:]))

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.ready_text and self.ready_text in line:
                self.ready.set()

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def pdserve_proc(*args: str, ready: str) -> Proc:
    return Proc([sys.executable, "-m", "deploy.cli", *args], ready)



@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    yield c
    c.stop()


def wait_for(cond, timeout=30.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return False
