"""The disaggregated cluster end to end on CPU: router + prefill + decode processes on loopback,
KV pushed over NIXL. Outputs must equal the offline engine's; bad input gets clear statuses; the
pools return to full; shutdown leaves no process behind."""
from __future__ import annotations

import concurrent.futures as cf
import json
import time
import urllib.error
import urllib.request

import grpc
import pytest

from engine import LLM, SamplingParams
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from tests.cluster.conftest import OFFLINE_KW, Cluster, wait_for

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 8], [11, 12], list(range(400, 422)), [9, 9, 9, 9],
           [70, 71, 72, 73, 74, 75, 76], list(range(1000, 1031)), [3], [123, 456, 789, 1011, 1213]]


@pytest.fixture(scope="module")
def offline():
    llm = LLM("tiny-llama", **OFFLINE_KW)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=sp)]


def _node_infos(cluster: Cluster) -> list:
    """Info of every node the router knows, asked directly over gRPC."""
    infos = []
    for line in cluster.lines:
        if "node ready on" in line:
            role, addr = line.split("]")[1].split()[0], line.strip().split()[-1]
            stub_cls = pb_grpc.PrefillNodeStub if role == "prefill" else pb_grpc.DecodeNodeStub
            try:
                infos.append(stub_cls(grpc.insecure_channel(addr)).Info(pb.InfoRequest(), timeout=5))
            except grpc.RpcError:
                pass
    return infos


def _pools_full(cluster: Cluster) -> bool:
    infos = _node_infos(cluster)
    return bool(infos) and all(i.num_free_pages == i.num_pages and i.num_running == 0 for i in infos)


def test_concurrent_greedy_outputs_equal_the_offline_engine(cluster, offline):
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: cluster.generate(p, max_tokens=10), PROMPTS))
    assert [toks for toks, _ in results] == offline
    assert all(last.finish_reason == "length" and last.usage.completion_tokens == 10 for _, last in results)
    assert wait_for(lambda: _pools_full(cluster))


def test_streaming_over_http_with_the_openai_client(cluster, offline):
    from openai import OpenAI

    client = OpenAI(base_url=cluster.http, api_key="none")
    stream = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    full = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert full.model_extra["token_ids"] == offline[0]
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]


@pytest.mark.parametrize("body,status,message", [
    ({"prompt": "x", "max_tokens": 4, "temperature": -1}, 400, "temperature"),
    ({"prompt": list(range(200)), "max_tokens": 4}, 400, "context limit"),
    ({"prompt": "", "max_tokens": 4}, 400, "empty"),
    ({"prompt": "x", "model": "gpt-5"}, 404, "gpt-5"),
    ({"prompt": {"not": "a prompt"}}, 400, "prompt"),
])
def test_bad_http_requests_get_4xx_with_a_message(cluster, body, status, message):
    req = urllib.request.Request(cluster.http + "/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == status and message in json.loads(e.value.read())["error"]["message"]


def test_bad_grpc_requests_get_invalid_argument(cluster):
    with pytest.raises(grpc.RpcError) as e:
        cluster.generate([1, 2, 3], max_tokens=4, top_p=0.0)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        cluster.generate(list(range(500)), max_tokens=4)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cancel_storm_frees_every_page_and_the_cluster_keeps_serving(cluster, offline):
    calls = []
    for i in range(12):
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPTS[i % len(PROMPTS)]),
                                 sampling=pb.SamplingParams(max_tokens=60, ignore_eos=True))
        calls.append(cluster.stub.Generate(req, timeout=120))
    for i, call in enumerate(calls):
        if i % 2:
            next(call)  # some are cancelled mid-stream, others before their first token
        call.cancel()
    # Well inside the 30 s KV transfer timeout: a reservation cancelled before P had its address is
    # freed by P's "abandoned" notice (the router still hands the address over), not by that timeout.
    full = wait_for(lambda: _pools_full(cluster), timeout=15)
    assert full, "pages or requests still held: " + "; ".join(
        f"{i.role} free {i.num_free_pages}/{i.num_pages} running {i.num_running} waiting {i.num_waiting}"
        for i in _node_infos(cluster))
    toks, last = cluster.generate(PROMPTS[1], max_tokens=10)
    assert toks == offline[1] and last.finish_reason == "length"


def test_stop_string_and_max_tokens_one(cluster):
    toks, last = cluster.generate(PROMPTS[0], max_tokens=1)
    assert len(toks) == 1 and last.finish_reason == "length"
    full = list(cluster.stub.Generate(pb.GenerateRequest(text="Hello world", sampling=pb.SamplingParams(
        max_tokens=6, ignore_eos=True)), timeout=60))
    text = "".join(d.text for d in full)
    stop = text.strip().split()[0] if text.strip() else None
    if stop:
        cut = list(cluster.stub.Generate(pb.GenerateRequest(text="Hello world", sampling=pb.SamplingParams(
            max_tokens=6, ignore_eos=True, stop=[stop])), timeout=60))
        assert cut[-1].finish_reason == "stop" and cut[-1].stop_reason == stop
        assert stop not in "".join(d.text for d in cut)
    assert wait_for(lambda: _pools_full(cluster))


def test_decode_node_killed_mid_stream_fails_its_requests_and_the_other_serves(offline):
    import os
    import signal

    c = Cluster(num_decode=2)
    try:
        reqs = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPTS[0]),
                                   sampling=pb.SamplingParams(max_tokens=80, ignore_eos=True)) for _ in range(4)]
        calls = [c.stub.Generate(r, timeout=120) for r in reqs]
        for call in calls:
            next(call)
        os.killpg(c.pids["decode0"], signal.SIGKILL)
        t0 = time.monotonic()
        finals = []
        for call in calls:
            finals.append(list(call)[-1])
        assert time.monotonic() - t0 < 60
        reasons = sorted(f.finish_reason for f in finals)
        assert set(reasons) <= {"length", "error"} and "error" in reasons
        assert all("decode node" in f.error for f in finals if f.finish_reason == "error")
        for p in PROMPTS[:3]:  # the survivor serves new requests with the right tokens
            toks, last = c.generate(p, max_tokens=10)
            assert last.finish_reason == "length" and toks == offline[PROMPTS.index(p)]
    finally:
        c.stop()
    assert wait_for(lambda: not c.descendants(), timeout=30), "processes left behind"


def test_shutdown_leaves_no_process_behind():
    c = Cluster()
    pids = c.descendants()
    assert len(pids) >= 6  # launcher, router, 2 nodes and their 2 engine processes
    c.stop()
    assert c.proc.returncode is not None
    assert wait_for(lambda: not c.descendants(), timeout=30), "processes left behind"


def _prefill_hit_rate(policy: str) -> float:
    c = Cluster(num_prefill=2, extra=["--policy", policy])
    try:
        systems = [list(range(2000 + 100 * s, 2040 + 100 * s)) for s in range(3)]  # 3 shared 40-token prefixes
        for turn in range(4):
            for s, system in enumerate(systems):
                c.generate(system + [50 + turn, 60 + s, 70 + turn], max_tokens=2)
        infos = [i for i in _node_infos(c) if i.role == "prefill"]
        return sum(i.prefix_cache_hits_tokens for i in infos) / sum(i.prefix_cache_queries_tokens for i in infos)
    finally:
        c.stop()


def test_prefix_aware_routing_raises_the_prefix_hit_rate_over_round_robin():
    rr, aware = _prefill_hit_rate("round_robin"), _prefill_hit_rate("prefix_aware")
    assert aware > rr + 0.1, (rr, aware)


def test_prefill_node_killed_mid_request_every_request_ends_and_pages_return():
    import os
    import signal

    c = Cluster(num_prefill=2, extra=["--kv-transfer-timeout", "3"])
    try:
        reqs = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(100 + i, 160 + i))),
                                   sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True)) for i in range(6)]
        calls = [c.stub.Generate(r, timeout=120) for r in reqs]
        time.sleep(0.3)
        os.killpg(c.pids["prefill0"], signal.SIGKILL)
        t0 = time.monotonic()
        finals = [list(call)[-1] for call in calls]
        assert time.monotonic() - t0 < 60
        assert all(f.finish_reason in ("length", "error") for f in finals)
        assert all(f.error for f in finals if f.finish_reason == "error")
        toks, last = c.generate(PROMPTS[3], max_tokens=5)  # the surviving prefill node serves
        assert last.finish_reason == "length" and len(toks) == 5, last.error
        # reservations that never got their KV are quarantined one transfer timeout, then freed
        assert wait_for(lambda: _pools_full(c), timeout=30)
    finally:
        c.stop()


def test_overload_is_answered_at_once_not_queued():
    c = Cluster()
    try:
        long_prompt = list(range(300, 390))  # 90 tokens: 23 of the decode node's 128 pages
        reqs = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=long_prompt),
                                   sampling=pb.SamplingParams(max_tokens=5, ignore_eos=True)) for _ in range(10)]
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(10) as pool:
            finals = list(pool.map(lambda r: list(c.stub.Generate(r, timeout=120))[-1], reqs))
        reasons = [f.finish_reason for f in finals]
        assert "length" in reasons and "error" in reasons
        assert all("overloaded" in f.error for f in finals if f.finish_reason == "error")
        assert time.monotonic() - t0 < 60
        assert wait_for(lambda: _pools_full(c), timeout=30)
    finally:
        c.stop()


def test_restarted_decode_node_is_a_new_incarnation_and_serves(offline):
    import os
    import signal
    import subprocess
    import sys

    from tests.cluster.conftest import ENGINE_ARGS

    c = Cluster()
    replacement = None
    try:
        addr = next(x.strip().split()[-1] for x in c.lines if "decode node ready on" in x)
        before = next(i for i in _node_infos(c) if i.role == "decode").incarnation
        os.killpg(c.pids["decode0"], signal.SIGKILL)
        replacement = subprocess.Popen([sys.executable, "-m", "deploy.cli", "decode", *ENGINE_ARGS, "--port",
                                        addr.rsplit(":", 1)[1]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)
        stub = pb_grpc.DecodeNodeStub(grpc.insecure_channel(addr))

        def new_incarnation():
            try:
                return stub.Info(pb.InfoRequest(), timeout=2).incarnation != before
            except grpc.RpcError:
                return False
        assert wait_for(new_incarnation, timeout=120)

        def served():
            try:
                return c.generate(PROMPTS[0], max_tokens=10)[0] == offline[0]
            except grpc.RpcError:
                return False
        assert wait_for(served, timeout=30, interval=1.0)
    finally:
        if replacement is not None:
            os.killpg(replacement.pid, signal.SIGTERM)
            replacement.wait(30)
        c.stop()


@pytest.mark.parametrize("faults,expected", [
    ("drop=1", "did not arrive"),  # WRITE lost, prefill believes it succeeded: decode must not answer success
    # WRITE stalled past the transfer timeout: P's push times out while D's wait for the KV does; the
    # client's first token is already out (P streams it before the push), so whichever side's end
    # reaches the router first ends the request
    ("stall=6", ("timed out", "did not arrive in time")),
])
def test_lost_or_stalled_kv_never_ends_in_success_and_frees_pages(faults, expected):
    c = Cluster(extra=["--kv-transfer-timeout", "2"], env={"PDSERVE_KV_FAULTS": faults})
    try:
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(4) as pool:
            finals = list(pool.map(lambda p: c.generate(p, max_tokens=5)[1], PROMPTS[:4]))
        expected = (expected,) if isinstance(expected, str) else expected
        assert all(f.finish_reason == "error" and any(e in f.error for e in expected) for f in finals), \
            [f.error for f in finals]
        assert time.monotonic() - t0 < 30
        assert wait_for(lambda: _pools_full(c), timeout=30)
    finally:
        c.stop()


def test_nodes_with_different_kv_layouts_are_refused_with_a_clear_error():
    from deploy.launcher import Component
    from engine.ports import free_port
    from tests.cluster.conftest import ENGINE_ARGS

    base = [a for a in ENGINE_ARGS]
    ports = [free_port() for _ in range(3)]
    comps = [Component("p", ["prefill", *base, "--port", str(ports[0])], "prefill node ready"),
             Component("d", ["decode", *base, "--page-size", "8", "--port", str(ports[1])], "decode node ready")]
    try:
        assert all(c.ready.wait(180) for c in comps)
        comps.append(Component("r", ["router", "--model", "tiny-llama", "--prefill", f"127.0.0.1:{ports[0]}",
                                     "--decode", f"127.0.0.1:{ports[1]}", "--grpc-port", str(ports[2]),
                                     "--http-port", str(free_port())], "router ready"))
        assert comps[-1].ready.wait(120)
        stub = pb_grpc.GenerateStub(grpc.insecure_channel(f"127.0.0.1:{ports[2]}"))
        final = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPTS[0]), sampling=pb.SamplingParams(
            max_tokens=4)), timeout=60))[-1]
        assert final.finish_reason == "error" and "page_size: 4 vs 8" in final.error
    finally:
        for c in comps:
            c.stop()


def test_collocated_cluster_serves_the_offline_tokens(offline):
    """`--num-prefill 0`: the baseline without disaggregation — decode nodes run whole requests."""
    c = Cluster(num_prefill=0, num_decode=2)
    try:
        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(lambda p: c.generate(p, max_tokens=10), PROMPTS))
        assert [toks for toks, _ in results] == offline
        assert all(last.finish_reason == "length" for _, last in results)
        infos = _node_infos(c)
        assert len(infos) == 2 and all(i.role == "decode" for i in infos)
        assert all(i.prefix_cache_queries_tokens > 0 for i in infos)  # both nodes ran prompts
        assert wait_for(lambda: _pools_full(c))
    finally:
        c.stop()
