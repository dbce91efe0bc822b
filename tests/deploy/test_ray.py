"""`pdserve ray up`: the YAML config's validation, and the cluster end to end on a local Ray instance
(CPU, tiny preset) — requests through the router's OpenAI HTTP API, a decode actor killed and
restarted by Ray on the same address, and a teardown that leaves no component process and no Ray."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from engine.ports import free_port
from deploy.ray.config import ConfigError, NodeGroupSpec, RayClusterConfig, RouterSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "ray"
PROMPTS = [[5, 17, 300, 42, 7, 99], [11, 12], list(range(400, 422))]
MAX_TOKENS = 6


def test_example_configs_load():
    cpu = RayClusterConfig.from_yaml(EXAMPLES / "example.yaml")
    assert cpu.model == "tiny-llama" and cpu.load_format == "dummy" and cpu.decode.bundles() == [{"CPU": 1.0}]
    gpu = RayClusterConfig.from_yaml(EXAMPLES / "gpu-example.yaml")
    assert gpu.prefill.bundles() == [{"CPU": 2.0, "GPU": 1.0}] * 8


def test_defaults_fill_what_the_yaml_leaves_out():
    c = RayClusterConfig.from_dict({"model": "tiny-llama"})
    assert (c.load_format, c.host, c.restart.max_restarts, c.router.policy) == ("auto", "127.0.0.1", 3, "least_load")
    assert c.prometheus_targets is None and c.cpus_needed() == 3.0
    assert c.prefill.role == "prefill" and c.decode.replicas == 1 and c.engine_args == ()


@pytest.mark.parametrize("data,message", [
    ({}, "model: required"),
    ({"model": "m", "modle": 1}, "unknown key 'modle'"),
    ({"model": "m", "decode": {"replicas": 0}}, "decode.replicas: must be an integer >= 1, got 0"),
    ({"model": "m", "prefill": {"gpus_per_replica": 3, "ep_size": 2}}, "multiple of ep_size"),
    ({"model": "m", "prefill": {"cpus_per_replica": 0}}, "prefill: a replica needs"),
    ({"model": "m", "decode": {"gpus": 1}}, "decode: unknown key 'gpus'"),
    ({"model": "m", "router": {"policy": "random"}}, "router.policy: must be one of"),
    ({"model": "m", "router": {"grpc_port": 9000, "http_port": 9000}}, "must differ"),
    ({"model": "m", "router": {"http_port": 70000}}, "router.http_port"),
    ({"model": "m", "engine_args": "--device cpu"}, "engine_args: must be a list of strings"),
    ({"model": "m", "engine_args": 5}, "engine_args: must be a list of strings"),
    ({"model": "m", "engine_args": ["--port", "1"]}, "--port is set by the config"),
    ({"model": "m", "load_format": "pt"}, "load_format"),
    ({"model": "m", "restart": {"max_restarts": "3"}}, "restart.max_restarts"),
    ({"model": "m", "router": [1]}, "router: must be a mapping"),
])
def test_invalid_config_is_a_clear_error_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        RayClusterConfig.from_dict(data)


def test_unreadable_or_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        RayClusterConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        RayClusterConfig.from_yaml(tmp_path / "missing.yaml")


def test_ep_group_bundles_split_gpus_and_cpus_per_rank():
    assert NodeGroupSpec("decode", gpus_per_replica=4, ep_size=4, cpus_per_replica=8).bundles() == \
        [{"CPU": 2.0, "GPU": 1.0}] * 4
    assert NodeGroupSpec("decode", ep_size=2, cpus_per_replica=1).bundles() == [{"CPU": 0.5}] * 2


# --- end to end ---------------------------------------------------------------------------------------

def _complete(http: str, prompt: list[int], timeout: float = 30) -> dict:
    body = json.dumps({"model": "tiny-llama", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{http}/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _metrics_answer(address: str) -> bool:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        return resp.status == 200 and b"# TYPE" in resp.read()


def _complete_when_served(http: str, prompt: list[int], timeout: float) -> dict:
    """The first successful completion within `timeout` (the router may still see the node as down)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            return _complete(http, prompt)
        except (urllib.error.URLError, OSError) as e:
            last = e
            time.sleep(0.5)
    raise AssertionError(f"no completion within {timeout} s after the restart: {last}")


def _processes_in_groups(pgids: set[int]) -> list[int]:
    """Live processes whose process group is one of `pgids` (a component and its engine processes)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) in pgids and state != "Z":
            out.append(int(entry))
    return out


def _descendants(root: int) -> set[int]:
    """Live processes below `root` (Ray's own processes, its workers, the components and their engines)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _wait_until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_ray_cluster_serves_survives_a_killed_decode_actor_and_leaves_nothing_behind(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="ray is a test dependency (pyproject [test])")
    from deploy.ray.launcher import RayCluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local instance of our own, never a shared cluster
    # Ray's raylet can reap a dead worker's children itself; turn that off, so this test checks that the
    # launcher alone ties a component's process to its actor (clusters may run without it).
    monkeypatch.setenv("RAY_kill_child_processes_on_worker_exit", "false")
    monkeypatch.setenv("RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper", "false")
    targets = tmp_path / "targets.json"
    config = RayClusterConfig(
        model="tiny-llama", load_format="dummy", startup_timeout_s=60, prometheus_targets=str(targets),
        engine_args=["--device", "cpu", "--num-pages", "256", "--page-size", "4", "--max-model-len", "96"],
        router=RouterSpec(grpc_port=free_port(), http_port=free_port()))
    cluster = RayCluster(config, num_cpus=4, include_dashboard=False)
    seen_pids: set[int] = set()
    try:
        endpoints = cluster.start()
        seen_pids |= set(cluster.pids().values())
        assert endpoints.http == f"http://127.0.0.1:{config.router.http_port}/v1"
        metrics = {t["labels"]["node"]: t["targets"][0] for t in json.loads(targets.read_text())}
        assert sorted(metrics) == ["decode-0", "prefill-0", "router"]
        assert all(_metrics_answer(address) for address in metrics.values())

        before = [_complete(endpoints.http, p) for p in PROMPTS]
        for r in before:
            assert r["choices"][0]["finish_reason"] == "length", r
            assert len(r["token_ids"]) == MAX_TOKENS and r["usage"]["completion_tokens"] == MAX_TOKENS

        decode = cluster.members["decode-0"]
        old_pid, address = decode.pid, decode.address
        cluster.kill_actor("decode-0")
        new_pid = cluster.wait_restarted("decode-0", timeout=60)
        seen_pids.add(new_pid)
        assert new_pid != old_pid
        assert ray.get(decode.actor.address.remote(), timeout=10) == address
        assert _wait_until(lambda: not _processes_in_groups({old_pid}), 10), "the killed actor's node lingers"

        # Same seeded weights, greedy sampling: the restarted decode node continues exactly as before.
        after = [_complete_when_served(endpoints.http, p, timeout=30) for p in PROMPTS]
        assert [r["token_ids"] for r in after] == [r["token_ids"] for r in before]
        assert _metrics_answer(metrics["decode-0"]), "the restarted decode node's /metrics moved"
        started = _descendants(os.getpid())  # Ray's processes, its workers, the components and their engines
    finally:
        cluster.shutdown()
    assert not ray.is_initialized()
    assert _wait_until(lambda: not _processes_in_groups(seen_pids), 15), \
        f"component processes left: {_processes_in_groups(seen_pids)}"
    assert _wait_until(lambda: not _alive(started), 30), f"processes left: {_alive(started)}"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_node_ray_cannot_place_is_a_clear_error_and_nothing_is_left(monkeypatch):
    ray = pytest.importorskip("ray", reason="ray is a test dependency (pyproject [test])")
    from deploy.ray.launcher import RayCluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = RayClusterConfig(model="tiny-llama", load_format="dummy", startup_timeout_s=2,
                              prefill=NodeGroupSpec("prefill", gpus_per_replica=1))
    cluster = RayCluster(config, num_cpus=4, num_gpus=0, include_dashboard=False)
    try:
        with pytest.raises(RuntimeError, match=r"prefill-0: Ray could not place 1 x \{'CPU': 1.0, 'GPU': 1.0\}"):
            cluster.start()
    finally:
        cluster.shutdown()
    assert not ray.is_initialized()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_pdserve_ray_up_serves_and_sigterm_leaves_no_process(tmp_path):
    pytest.importorskip("ray", reason="ray is a test dependency (pyproject [test])")
    http_port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text((EXAMPLES / "example.yaml").read_text().replace("grpc_port: 50051", f"grpc_port: {free_port()}")
                      .replace("http_port: 8000", f"http_port: {http_port}"))
    driver = subprocess.Popen([sys.executable, "-c", "import sys; from deploy.ray.launcher import main; "
                               "sys.exit(main(sys.argv[1:]))", "up", str(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    lines: list[str] = []
    ready = threading.Event()

    def pump():
        for line in driver.stdout:
            lines.append(line)
            if line.startswith("pdserve ray up: gRPC"):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    started: set[int] = set()
    try:
        assert ready.wait(90), "pdserve ray up did not come up:\n" + "".join(lines[-40:])
        line = next(x for x in lines if x.startswith("pdserve ray up: gRPC"))
        assert f"OpenAI HTTP on http://127.0.0.1:{http_port}/v1" in line
        component_pids = {int(p) for p in re.findall(r"=(\d+)", line.split(" pids ")[1])}
        assert len(component_pids) == 3
        r = _complete(f"http://127.0.0.1:{http_port}/v1", PROMPTS[0])
        assert r["choices"][0]["finish_reason"] == "length" and len(r["token_ids"]) == MAX_TOKENS
        started = _descendants(driver.pid)
        assert component_pids <= started
    finally:
        driver.send_signal(signal.SIGTERM)
        try:
            code = driver.wait(60)
        except subprocess.TimeoutExpired:
            driver.kill()
            raise
    assert code == 0, "".join(lines[-40:])
    assert _wait_until(lambda: not _alive(started), 30), f"processes left: {_alive(started)}"
