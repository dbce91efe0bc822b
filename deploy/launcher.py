"""`pdserve up`: router + N prefill + M decode processes on this machine.

With enough GPUs, each node gets its own (`--ep-size` of them, via CUDA_VISIBLE_DEVICES); with
fewer, all nodes share them and split memory by `--gpu-memory-utilization`.

Each component is its own OS process (`pdserve prefill|decode|router`), started in its own
process group; the launcher waits until each prints its ready line, prints the endpoints, and on
Ctrl-C / SIGTERM (or when any component exits) stops them all — SIGTERM, then SIGKILL after a
grace period — so no process is left behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from engine.ports import free_port


def _flag(argv: list[str], flag: str, default: str | None = None) -> str | None:
    """The value after `flag` in an argument list (the engine flags `up` forwards to its nodes)."""
    return argv[argv.index(flag) + 1] if flag in argv else default


def write_targets(path: str, targets: list[dict]) -> None:
    """Prometheus file_sd JSON, written atomically (Prometheus re-reads the file when it changes)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(targets, f, indent=1)
    os.replace(tmp, path)


def visible_gpus() -> list[str]:
    """GPU ids this launcher may hand out: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def assign_gpus(num_nodes: int, per_node: int, gpus: list[str]) -> list[str | None]:
    """Each node its own `per_node` GPUs when there are enough; otherwise None (all share them)."""
    if len(gpus) < num_nodes * per_node:
        return [None] * num_nodes
    return [",".join(gpus[i * per_node:(i + 1) * per_node]) for i in range(num_nodes)]


class Component:
    def __init__(self, name: str, argv: list[str], ready_text: str, gpus: str | None = None,
                 env: dict | None = None):
        self.name = name
        self.ready_text = ready_text
        self.ready = threading.Event()
        env = dict(os.environ, **(env or {}), **({"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True, bufsize=1,
                                     env=env)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if self.ready_text in line:
                self.ready.set()
            sys.stderr.write(f"[{self.name}] {line}")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left in its group (engine processes)
        except ProcessLookupError:
            pass
        self.proc.wait()


def up(engine_argv: list[str], model: str, num_prefill: int, num_decode: int, host: str, grpc_port: int,
       http_port: int, policy: str, startup_timeout_s: float = 900.0, redis_url: str | None = None,
       slo: str | None = None, prometheus_targets: str | None = None, router_argv: list[str] = (),
       router_env: dict | None = None) -> int:
    comps: list[Component] = []
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        addrs = {"prefill": [], "decode": []}
        targets = []  # Prometheus file_sd entries: every process's /metrics
        ep_size = int(_flag(engine_argv, "--ep-size", "1"))
        on_cpu = _flag(engine_argv, "--device") == "cpu"
        gpu_sets = iter(assign_gpus(num_prefill + num_decode, ep_size, [] if on_cpu else visible_gpus()))
        for role, n in (("prefill", num_prefill), ("decode", num_decode)):
            for i in range(n):
                port, metrics_port = (free_port(host, exclude=(grpc_port, http_port)) for _ in range(2))
                addrs[role].append(f"{host}:{port}")
                name = f"{role}{i}"
                argv = [role, "--host", host, "--port", str(port), "--metrics-port", str(metrics_port),
                        "--node-name", name, *engine_argv]
                if num_prefill == 0:  # the decode nodes run the prompts too
                    argv.append("--collocated")
                if redis_url:
                    argv += ["--redis-url", redis_url]
                gpus = next(gpu_sets)
                comps.append(Component(name, argv, f"{role} node ready", gpus))
                where = f"GPU(s) {gpus}" if gpus is not None else _flag(engine_argv, "--device", "auto")
                print(f"pdserve up: {name} loading {model} ({_flag(engine_argv, '--load-format', 'auto')} weights, "
                      f"{_flag(engine_argv, '--dtype', 'auto')}, {where}, EP {ep_size})", file=sys.stderr, flush=True)
                targets.append({"targets": [f"{host}:{metrics_port}"], "labels": {"role": role, "node": name}})
        router_argv = ["router", *router_argv, "--model", model, "--host", host, "--grpc-port", str(grpc_port),
                       "--http-port", str(http_port), "--policy", policy, "--node-name", "router"]
        if redis_url:
            router_argv += ["--redis-url", redis_url]
        else:
            for a in addrs["prefill"]:
                router_argv += ["--prefill", a]
            for a in addrs["decode"]:
                router_argv += ["--decode", a]
        if num_prefill == 0:
            router_argv.append("--collocated")
        if slo:
            router_argv += ["--slo", slo]
        if _flag(engine_argv, "--tokenizer"):  # node-only flags (e.g. --kv-transfer-timeout) stay with the nodes
            router_argv += ["--tokenizer", _flag(engine_argv, "--tokenizer")]
        comps.append(Component("router", router_argv, "router ready", env=router_env))
        targets.append({"targets": [f"{host}:{http_port}"], "labels": {"role": "router", "node": "router"}})
        if prometheus_targets:
            write_targets(prometheus_targets, targets)
        t0 = time.monotonic()
        deadline = t0 + startup_timeout_s
        for c in comps:
            while not c.ready.wait(0.5):
                if c.proc.poll() is not None or stop.is_set() or time.monotonic() > deadline:
                    print(f"pdserve up: {c.name} failed to start (exit code {c.proc.poll()})", file=sys.stderr)
                    return 1
            print(f"pdserve up: {c.name} ready after {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        pids = " ".join(f"{c.name}={c.proc.pid}" for c in comps)
        scheme = "https" if "--tls-cert" in router_argv else "http"
        print(f"pdserve up: gRPC Generate on {host}:{grpc_port}, OpenAI HTTP on {scheme}://{host}:{http_port}/v1 "
              f"({num_prefill} prefill, {num_decode} decode; model {model}) pids {pids}", flush=True)
        reported: set[str] = set()
        while not stop.wait(0.5):
            for c in comps:
                if c.proc.poll() is not None and c.name not in reported:
                    reported.add(c.name)  # a node may die; the router routes around it
                    print(f"pdserve up: {c.name} exited (code {c.proc.returncode})", file=sys.stderr, flush=True)
            if comps[-1].proc.poll() is not None:
                return 1  # without the router nothing can be served
        return 0
    finally:
        for c in reversed(comps):
            c.stop()
