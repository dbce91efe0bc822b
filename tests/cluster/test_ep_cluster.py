"""Expert parallelism inside the disaggregated cluster: `pdserve up --ep-size 2` on CPU runs each
node as two gloo EP ranks (attention data-parallel, MoE expert-parallel); every rank pushes its
requests' KV to whichever decode rank reserved the pages, and the greedy outputs equal a single
engine's. The nodes export the EP backend they use and per-rank engine metrics."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest

from engine.ports import free_port
from engine import LLM, SamplingParams
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from tests.cluster.conftest import ENGINE_ARGS, OFFLINE_KW, Cluster, pdserve_proc, wait_for

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 8], [11, 12], list(range(400, 422)), [9, 9, 9, 9],
           [70, 71, 72, 73, 74, 75, 76], [123, 456, 789, 1011, 1213]]


def test_ep2_nodes_serve_the_single_engine_tokens(tmp_path):
    offline = [o.token_ids for o in LLM("tiny-qwen3-moe", **OFFLINE_KW).generate(
        prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))]
    targets = tmp_path / "targets.json"
    cluster = Cluster(extra=["--model", "tiny-qwen3-moe", "--ep-size", "2", "--num-redundant-experts", "2",
                             "--eplb-interval", "4", "--eplb-window", "2", "--prometheus-targets", str(targets)])
    try:
        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(lambda p: cluster.generate(p, max_tokens=8), PROMPTS))
        assert [toks for toks, _ in results] == offline
        assert all(last.finish_reason == "length" for _, last in results)
        nodes = [t for t in json.loads(targets.read_text()) if t["labels"]["role"] != "router"]

        def scrape(target):
            with urllib.request.urlopen(f"http://{target['targets'][0]}/metrics", timeout=10) as r:
                return r.read().decode()
        for t in nodes:
            text = scrape(t)
            assert 'ep_backend="fixed"' in text and 'ep_size="2"' in text
            ranks = {line.split('rank="')[1].split('"')[0] for line in text.splitlines()
                     if line.startswith("pdserve:engine_steps_total")}
            assert ranks == {"0", "1"}
        # Both decode ranks took requests, and every page on every rank came back.
        decode = scrape(next(t for t in nodes if t["labels"]["role"] == "decode"))
        steps = [float(line.rsplit(" ", 1)[1]) for line in decode.splitlines()
                 if line.startswith("pdserve:engine_steps_total")]
        assert len(steps) == 2 and min(steps) > 0

        def usage_zero():
            lines = [line for t in nodes for line in scrape(t).splitlines()
                     if line.startswith("pdserve:num_requests_running")]
            return lines and all(line.endswith(" 0.0") for line in lines)
        assert wait_for(usage_zero)
    finally:
        cluster.stop()
    assert wait_for(lambda: not cluster.descendants(), timeout=30), "processes left behind"


def test_one_ep_group_spanning_two_decode_hosts():
    """Two decode node processes stand in for two hosts of one EP group (`--ep-nnodes 2`, 2 ranks
    each, rendezvous at the leader's `--ep-master`): each serves its own requests (attention
    data-parallel) while every MoE layer runs across all four ranks; outputs equal one engine's."""
    offline = [o.token_ids for o in LLM("tiny-qwen3-moe", **OFFLINE_KW).generate(
        prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))]
    engine = [*ENGINE_ARGS, "--model", "tiny-qwen3-moe"]
    master = f"127.0.0.1:{free_port()}"
    procs = []
    try:
        procs.append(pdserve_proc("prefill", "--port", str(p_port := free_port()), *engine, ready="prefill node ready"))
        # Both hosts must be starting before either can finish: the rendezvous waits for all ranks.
        ports = [free_port(), free_port()]
        hosts: list = [None, None]

        def start(i):
            hosts[i] = pdserve_proc("decode", "--port", str(ports[i]), *engine, "--ep-size", "4", "--ep-nnodes", "2",
                                    "--ep-node-rank", str(i), "--ep-master", master, "--metrics-port", "0",
                                    ready="decode node ready")
        threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert all(hosts), "decode hosts did not start"
        procs += hosts
        grpc_port = free_port()
        procs.append(pdserve_proc("router", "--model", "tiny-qwen3-moe", "--prefill", f"127.0.0.1:{p_port}",
                                  "--decode", f"127.0.0.1:{ports[0]}", "--decode", f"127.0.0.1:{ports[1]}",
                                  "--policy", "round_robin", "--grpc-port", str(grpc_port), "--http-port",
                                  str(free_port()), ready="router ready"))
        def gen(ids):
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
                req = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True))
                req.token_ids.ids.extend(ids)
                deltas = list(pb_grpc.GenerateStub(ch).Generate(req, timeout=120))
            return [t for d in deltas for t in d.token_ids], deltas[-1]
        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(gen, PROMPTS))
        assert [toks for toks, _ in results] == offline, [last.error for _, last in results]
        # Each host's front exports its own two ranks of the group (global ranks 0,1 and 2,3).
        for host, ranks in zip(hosts, ({"0", "1"}, {"2", "3"})):
            url = next(line.split()[-1] for line in host.lines if "metrics on" in line)
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
            assert {line.split('rank="')[1].split('"')[0] for line in text.splitlines()
                    if line.startswith("pdserve:engine_steps_total")} == ranks
            assert 'ep_size="4"' in text
    finally:
        for p in reversed(procs):
            p.kill(signal.SIGTERM)


def test_a_dead_ep_rank_takes_its_node_down_cleanly_and_the_cluster_serves_on():
    """Killing one EP rank of a decode node: the node's requests end with an error (no hang), the
    node's other rank and its front exit (code 1, so a supervisor can restart it), the router
    routes around it, and new requests succeed on the other decode node."""
    c = Cluster(num_decode=2, extra=["--model", "tiny-qwen3-moe", "--ep-size", "2"])
    try:
        def ranks_of(pid):
            out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True,
                                 text=True).stdout
            return [int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line]
        victim_ranks = ranks_of(c.pids["decode0"])
        assert len(victim_ranks) == 2
        calls = [c.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5 + i, 6, 7, 8]),
                                                    sampling=pb.SamplingParams(max_tokens=40, ignore_eos=True)),
                                 timeout=120) for i in range(6)]
        time.sleep(1.0)
        os.kill(victim_ranks[1], signal.SIGKILL)
        t0 = time.monotonic()
        finals = []
        for call in calls:
            try:
                finals.append(list(call)[-1])
            except grpc.RpcError as e:
                raise AssertionError(f"a request ended without a terminal status: {e}") from None
        assert time.monotonic() - t0 < 90
        assert all(f.finish_reason in ("length", "error") for f in finals)
        assert all(f.error for f in finals if f.finish_reason == "error")
        assert wait_for(lambda: any("decode0 exited (code 1)" in line for line in c.lines), timeout=60)
        assert wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in victim_ranks), 60)
        toks, last = c.generate([9, 9, 9, 9], max_tokens=5)
        assert last.finish_reason == "length" and len(toks) == 5, last.error
    finally:
        c.stop()
    assert wait_for(lambda: not c.descendants(), timeout=30), "processes left behind"
