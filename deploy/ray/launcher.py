"""`pdserve ray up CONFIG`: the cluster as Ray actors — one `ComponentActor` per prefill node, decode
node and router — placed and restarted by Ray.

Every component gets its own STRICT_PACK placement group. A node is one EP group: `ep_size` bundles,
one per rank, on one host; the node's actor holds bundle 0, `RankSlot` actors hold the others and report
their GPUs, and the node process (which runs all its ranks) sees them all. An actor runs its component
as a subprocess (`python -m deploy.cli prefill|decode|router`, as deploy/launcher.py does) on ports the
driver chose, so a restarted actor comes back on the same addresses. The subprocess is tied to the
actor: it dies with the actor's worker (PR_SET_PDEATHSIG), and if it exits on its own the actor exits
too, so Ray restarts both (up to `restart.max_restarts`).

The driver prints the endpoints, reports restarts, and on Ctrl-C / SIGTERM stops the components,
removes the placement groups and disconnects from Ray (stopping Ray if it started it). No serving
logic here.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deploy.launcher import write_targets
from deploy.ray.config import ConfigError, NodeGroupSpec, RayClusterConfig
from engine.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child must not dlopen


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec: SIGKILL it when the thread that started it exits
    (the actor's worker died), and exit at once if that already happened."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def stop_process_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the group `proc` leads, then SIGKILL whatever is left of it (its engine processes)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _advertised(host: str) -> str:
    return ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "") else host


@ray.remote
class ComponentActor:
    """One pdserve process (a node or the router). `__init__` returns once it printed its ready line;
    a restarted actor runs `__init__` again with the same arguments, hence the same port."""

    def __init__(self, name: str, argv: list[str], ready_text: str, host: str, port: int,
                 startup_timeout_s: float, extra_gpu_ids: list[str] = (), advertise: bool = False):
        self.name = name
        self._address = f"{_advertised(host)}:{port}"
        if advertise and _advertised(host) != host:  # bound to all interfaces: peers dial this host's IP
            argv = [*argv, "--advertise-host", _advertised(host)]
        self._stopping = False
        self._ready, self._exited = threading.Event(), threading.Event()
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self.proc: subprocess.Popen | None = None
        cmd = [sys.executable, "-m", "deploy.cli", *argv]
        # The thread that starts the process outlives it (it waits for it), so PDEATHSIG — which fires
        # when the *thread* that forked exits — fires only when this worker process dies.
        threading.Thread(target=self._run, args=(cmd, self._env(extra_gpu_ids), ready_text), daemon=True,
                         name=f"{name}-process").start()
        deadline = time.monotonic() + startup_timeout_s
        while not self._ready.wait(0.5):
            if self._exited.is_set() or time.monotonic() > deadline:
                code = self.proc.poll() if self.proc else None
                self.stop()
                raise RuntimeError(f"{name} failed to start (exit code {code}); its last output:\n"
                                   + "".join(self._tail))

    @staticmethod
    def _env(extra_gpu_ids) -> dict[str, str]:
        import deploy

        env = dict(os.environ)
        # Run the code this actor imported, wherever the worker found it.
        code_root = str(Path(deploy.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (code_root, env.get("PYTHONPATH")) if p)
        gpus = list(dict.fromkeys([str(g) for g in ray.get_gpu_ids()] + [str(g) for g in extra_gpu_ids]))
        if gpus:  # the node process runs every rank of its EP group: it sees every bundle's GPUs
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        return env

    def _run(self, cmd: list[str], env: dict[str, str], ready_text: str) -> None:
        me = os.getpid()
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                         env=env, start_new_session=True, preexec_fn=lambda: _die_with_parent(me))
        except OSError as e:
            self._tail.append(f"cannot start {cmd[:4]}: {e}\n")
            self._exited.set()
            return
        for line in self.proc.stdout:
            self._tail.append(line)
            if ready_text in line:
                self._ready.set()
            print(f"[{self.name}] {line}", end="", flush=True)
        self.proc.wait()
        self._exited.set()
        if self._ready.is_set() and not self._stopping:
            # Died while serving: end the actor too, so that Ray restarts both.
            print(f"[{self.name}] exited with code {self.proc.returncode}; restarting", flush=True)
            stop_process_group(self.proc, grace_s=0)
            os._exit(1)

    def ping(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pid(self) -> int:
        return self.proc.pid

    def address(self) -> str:
        return self._address

    def stop(self) -> None:
        self._stopping = True
        if self.proc is not None:
            stop_process_group(self.proc)


@ray.remote
class RankSlot:
    """Holds one EP rank's bundle beyond the first, so Ray accounts its GPUs to the node's group."""

    def gpu_ids(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]


@dataclass
class Member:
    name: str
    role: str  # prefill | decode | router
    actor: ray.actor.ActorHandle
    metrics_port: int  # /metrics (the router serves it on its HTTP port)
    slots: list = field(default_factory=list)  # RankSlot actors holding the EP group's other bundles
    pid: int | None = None
    address: str | None = None  # host:port peers dial (the router's: its gRPC port)
    dead: bool = False

    @property
    def metrics_address(self) -> str:
        return f"{self.address.rsplit(':', 1)[0]}:{self.metrics_port}"


@dataclass(frozen=True)
class Endpoints:
    grpc: str  # host:port of the Generate service
    http: str  # base URL of the OpenAI API, http://host:port/v1


class RayCluster:
    """Router + prefill + decode actors on a Ray cluster. `ray_init_kwargs` go to `ray.init` when this
    object connects (e.g. num_cpus for a local instance); with Ray already initialised it uses that."""

    def __init__(self, config: RayClusterConfig, address: str | None = None, **ray_init_kwargs):
        self.config = config
        self.address = address
        self.ray_init_kwargs = ray_init_kwargs
        self.members: dict[str, Member] = {}
        self.endpoints: Endpoints | None = None
        self._placement_groups: list[PlacementGroup] = []
        self._owns_ray_connection = False

    def connect(self) -> None:
        if ray.is_initialized():
            return
        kwargs = dict(self.ray_init_kwargs)
        if self.address is None:  # a local instance: big enough for the config, whatever the core count
            kwargs.setdefault("num_cpus", max(os.cpu_count() or 1, math.ceil(self.config.cpus_needed())))
        # Workers import deploy.ray.launcher and start `python -m deploy.cli`: give them this checkout
        # (the installed package serves hosts that do not share this path).
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        ray.init(address=self.address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **kwargs)
        self._owns_ray_connection = True

    def start(self) -> Endpoints:
        self.connect()
        cfg = self.config
        nodes = [self._start_node(spec, i) for spec in (cfg.prefill, cfg.decode) for i in range(spec.replicas)]
        deadline = time.monotonic() + cfg.startup_timeout_s
        for m in nodes:
            self._wait_started(m, deadline)
        router = self._start_router([m for m in nodes if m.role == "prefill"],
                                    [m for m in nodes if m.role == "decode"])
        self._wait_started(router, deadline)
        host = router.address.rsplit(":", 1)[0]
        self.endpoints = Endpoints(router.address, f"http://{host}:{cfg.router.http_port}/v1")
        if cfg.prometheus_targets:
            write_targets(cfg.prometheus_targets, self.prometheus_targets())
        return self.endpoints

    def prometheus_targets(self) -> list[dict]:
        """Every process's /metrics as Prometheus file_sd entries (see deploy/prometheus/prometheus.yml)."""
        return [{"targets": [m.metrics_address], "labels": {"role": m.role, "node": m.name}}
                for m in self.members.values()]

    def _place(self, name: str, bundles: list[dict[str, float]]) -> PlacementGroup:
        """A STRICT_PACK placement group for `name`, once Ray has placed it (bounded by the startup timeout)."""
        pg = placement_group(bundles, strategy="STRICT_PACK", name=f"pdserve-{name}")
        self._placement_groups.append(pg)
        timeout_s, first_s = self.config.startup_timeout_s, min(10.0, self.config.startup_timeout_s)
        if pg.wait(timeout_seconds=first_s):
            return pg
        print(f"pdserve ray: {name} waits for resources: {len(bundles)} x {bundles[0]} on one host; "
              f"available now {ray.available_resources()}", file=sys.stderr, flush=True)
        if timeout_s <= first_s or not pg.wait(timeout_seconds=timeout_s - first_s):
            raise RuntimeError(f"{name}: Ray could not place {len(bundles)} x {bundles[0]} on one host within "
                               f"{self.config.startup_timeout_s:.0f} s (cluster resources: {ray.cluster_resources()})")
        return pg

    def _start_node(self, spec: NodeGroupSpec, index: int) -> Member:
        cfg, name = self.config, f"{spec.role}-{index}"
        pg = self._place(name, spec.bundles())
        bundle = spec.bundle()
        resources = dict(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0))
        slots = [RankSlot.options(**resources, max_restarts=-1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=k)).remote() for k in range(1, spec.ep_size)]
        extra_gpu_ids = [g for ids in ray.get([s.gpu_ids.remote() for s in slots]) for g in ids]
        router = (cfg.router.grpc_port, cfg.router.http_port)
        # fixed: a restart keeps the address
        port, metrics_port = free_port(cfg.host, exclude=router), free_port(cfg.host, exclude=router)
        argv = [spec.role, "--host", cfg.host, "--port", str(port), "--metrics-port", str(metrics_port),
                "--node-name", name, "--model", cfg.model, "--load-format", cfg.load_format, *cfg.engine_args]
        if spec.ep_size > 1:
            argv += ["--ep-size", str(spec.ep_size)]
        if cfg.redis_url:
            argv += ["--redis-url", cfg.redis_url]
        if cfg.router.slo:
            argv += ["--slo", cfg.router.slo]
        actor = ComponentActor.options(
            name=name, **resources, max_restarts=cfg.restart.max_restarts, max_task_retries=-1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        ).remote(name, argv, f"{spec.role} node ready", cfg.host, port, cfg.startup_timeout_s, extra_gpu_ids,
                 advertise=True)
        self.members[name] = Member(name, spec.role, actor, metrics_port, slots)
        return self.members[name]

    def _start_router(self, prefill: list[Member], decode: list[Member]) -> Member:
        cfg, r = self.config, self.config.router
        argv = ["router", "--model", cfg.model, "--host", cfg.host, "--grpc-port", str(r.grpc_port),
                "--http-port", str(r.http_port), "--policy", r.policy, "--node-name", "router"]
        if cfg.redis_url:
            argv += ["--redis-url", cfg.redis_url]
        else:
            argv += [a for m in prefill for a in ("--prefill", m.address)]
            argv += [a for m in decode for a in ("--decode", m.address)]
        if r.slo:
            argv += ["--slo", r.slo]
        if "--tokenizer" in cfg.engine_args:  # node-only engine flags stay with the nodes
            argv += ["--tokenizer", cfg.engine_args[cfg.engine_args.index("--tokenizer") + 1]]
        pg = self._place("router", [{"CPU": r.cpus}])
        actor = ComponentActor.options(
            name="router", num_cpus=r.cpus, max_restarts=cfg.restart.max_restarts, max_task_retries=-1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        ).remote("router", argv, "router ready", cfg.host, r.grpc_port, cfg.startup_timeout_s)
        self.members["router"] = Member("router", "router", actor, r.http_port)
        return self.members["router"]

    def _wait_started(self, m: Member, deadline: float) -> None:
        try:
            m.address, m.pid = ray.get([m.actor.address.remote(), m.actor.pid.remote()],
                                       timeout=max(deadline - time.monotonic(), 1))
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"{m.name} did not start within {self.config.startup_timeout_s:.0f} s") from None
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"{m.name} failed to start: {e}") from None

    def pids(self) -> dict[str, int]:
        """The component processes' pids as last seen (a restart changes them)."""
        return {name: m.pid for name, m in self.members.items()}

    def kill_actor(self, name: str) -> None:
        """Kill the actor's worker as a crash would; Ray restarts it (fault injection for tests)."""
        ray.kill(self.members[name].actor, no_restart=False)

    def wait_restarted(self, name: str, timeout: float) -> int:
        """Wait until `name` runs a new process (a restart), and return its pid."""
        m = self.members[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid = ray.get(m.actor.pid.remote(), timeout=max(deadline - time.monotonic(), 0.1))
            except ray.exceptions.GetTimeoutError:
                break
            if pid != m.pid:
                m.pid = pid
                return pid
            time.sleep(0.2)
        raise TimeoutError(f"{name} was not restarted within {timeout:.0f} s (pid still {m.pid})")

    def supervise(self, stop: threading.Event, poll_s: float = 1.0) -> int:
        """Until `stop` is set: report restarts and actors that are dead for good. Returns 1 if the
        router is dead for good (nothing can be served), else 0."""
        pending: dict[str, ray.ObjectRef] = {}
        while not stop.wait(poll_s):
            live = [m for m in self.members.values() if not m.dead]
            for m in live:
                pending.setdefault(m.name, m.actor.pid.remote())
            if not pending:
                return 0
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0)
            for m in live:
                if pending[m.name] not in ready:
                    continue  # busy or restarting: look again next round
                try:
                    pid = ray.get(pending.pop(m.name))
                except ray.exceptions.RayActorError as e:
                    m.dead = True
                    print(f"pdserve ray: {m.name} is dead, restarts used up: {e}", file=sys.stderr, flush=True)
                    if m.role == "router":
                        return 1
                    continue
                if pid != m.pid:
                    print(f"pdserve ray: {m.name} restarted (pid {m.pid} -> {pid}, same address {m.address})",
                          file=sys.stderr, flush=True)
                    m.pid = pid
        return 0

    def shutdown(self) -> None:
        """Stop the router, then the nodes; kill their actors; remove the placement groups; disconnect
        from Ray (stopping it if this object started it). Safe to call twice."""
        if ray.is_initialized():
            router = [m for m in self.members.values() if m.role == "router"]
            nodes = [m for m in self.members.values() if m.role != "router"]
            for group in (router, nodes):
                refs = [m.actor.stop.remote() for m in group if not m.dead]
                for ref in refs:
                    try:
                        ray.get(ref, timeout=STOP_GRACE_S + 5)
                    except ray.exceptions.RayError:
                        pass  # dead or stuck: ray.kill below ends its worker, PDEATHSIG its process
            for m in self.members.values():
                for a in [m.actor, *m.slots]:
                    ray.kill(a, no_restart=True)
            for pg in self._placement_groups:
                remove_placement_group(pg)
            if self._owns_ray_connection:
                ray.shutdown()
        self.members.clear()
        self._placement_groups.clear()


def up(config: RayClusterConfig, address: str | None = None) -> int:
    cluster = RayCluster(config, address)
    stop = threading.Event()
    supervising = False

    def on_signal(*_):
        stop.set()
        if not supervising:
            raise KeyboardInterrupt

    try:
        cluster.connect()
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own SIGTERM handler
            signal.signal(sig, on_signal)
        ep = cluster.start()
        pids = " ".join(f"{name}={pid}" for name, pid in cluster.pids().items())
        print(f"pdserve ray up: gRPC Generate on {ep.grpc}, OpenAI HTTP on {ep.http} ({config.prefill.replicas} "
              f"prefill, {config.decode.replicas} decode; model {config.model}) pids {pids}", flush=True)
        supervising = True
        return cluster.supervise(stop)
    except RuntimeError as e:
        print(f"pdserve ray up: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pdserve ray up: interrupted while starting", file=sys.stderr)
        return 130
    finally:
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve ray", description="run the cluster on Ray")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("up", help="start router + prefill + decode as Ray actors (see deploy/ray/example.yaml)")
    p.add_argument("config", help="YAML config")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray instance)")
    args = parser.parse_args(argv)
    try:
        config = RayClusterConfig.from_yaml(args.config)
    except ConfigError as e:
        print(f"pdserve ray up: {e}", file=sys.stderr)
        return 2
    return up(config, args.address or os.environ.get("RAY_ADDRESS"))


if __name__ == "__main__":
    sys.exit(main())
