"""Operating the cluster with real servers on loopback: a Prometheus server scrapes a running
`pdserve up` under load and answers TTFT/TPOT quantiles from our histograms; with a real Redis,
two routers share one cluster and a killed decode node drops out of routing within its
heartbeat TTL, after which no request is lost to it. (redis-server and prometheus are Debian
packages that `make install` puts on CI; the tests skip only if they are missing.)"""
from __future__ import annotations

import concurrent.futures as cf
import json
import math
import shutil
import signal
import time
import urllib.parse
import urllib.request

import grpc
import pytest

from engine.ports import free_port
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from tests.cluster.conftest import ENGINE_ARGS, Cluster, Proc, pdserve_proc as _pdserve

pytestmark = pytest.mark.slow



def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package; `make install` installs it as root)")
    return path


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _wait(cond, timeout: float, what: str, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ----------------------------------------------------------------------------- Prometheus

def _prom_query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(_get(url))
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_the_cluster_and_answers_ttft_tpot_quantiles(tmp_path):
    prometheus = _need("prometheus")
    targets = tmp_path / "targets.json"
    cluster = Cluster(extra=["--prometheus-targets", str(targets), "--slo", "ttft:250 tpot:40"])
    prom = None
    try:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: pdserve\n    honor_labels: true\n"
            f"    file_sd_configs: [{{files: ['{targets}'], refresh_interval: 1s}}]\n")
        port = free_port()
        prom = Proc([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{port}"], "Server is ready to receive web requests")
        # Load: 24 requests, 8 at a time, through the public gRPC API.
        num = 24
        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: cluster.generate(ids=[3 + i, 5, 7, 11, 13], max_tokens=6), range(num)))
        assert all(final.finish_reason == "length" for _, final in results)
        # Every process is a healthy target, and the router's counts reached Prometheus.
        _wait(lambda: len([r for r in _prom_query(port, 'up{job="pdserve"}') if r["value"][1] == "1"]) == 3,
              30, "three healthy scrape targets")
        count = 'sum(pdserve:time_to_first_token_seconds_count{role="router"})'
        _wait(lambda: (r := _prom_query(port, count)) and float(r[0]["value"][1]) >= num, 30,
              "the load's TTFT observations in Prometheus")
        quantiles = {}
        for metric in ("time_to_first_token_seconds", "request_time_per_output_token_seconds"):
            for q in (0.5, 0.9, 0.99):
                expr = (f'histogram_quantile({q}, sum by (le) '
                        f'(pdserve:{metric}_bucket{{role="router",model="tiny-llama"}}))')
                res = _prom_query(port, expr)
                assert len(res) == 1, (expr, res)
                quantiles[(metric, q)] = float(res[0]["value"][1])
        for (metric, q), v in quantiles.items():
            assert math.isfinite(v) and v > 0, (metric, q, v)
        assert quantiles[("time_to_first_token_seconds", 0.5)] <= quantiles[("time_to_first_token_seconds", 0.99)]
        # The configured SLO targets are bucket boundaries, so "fraction under SLO" is exact there.
        under = _prom_query(port, 'sum(pdserve:time_to_first_token_seconds_bucket{role="router",le="0.25"})')
        assert under and 0 <= float(under[0]["value"][1]) <= num
        # Node-side series arrive too: KV transfer time and its split (exposed, destination wait, post delay,
        # write tail) on the prefill node, ITL on the decode node, engine state per rank.
        for expr in ('sum(pdserve:kv_transfer_time_seconds_count{role="prefill"})',
                     'sum(pdserve:kv_transfer_exposed_seconds_count{role="prefill"})',
                     'sum(pdserve:kv_destination_wait_seconds_count{role="prefill"})',
                     'sum(pdserve:kv_post_delay_seconds_count{role="prefill"})',
                     'sum(pdserve:kv_write_tail_seconds_count{role="prefill"})',
                     'sum(pdserve:kv_write_call_seconds_count{role="prefill"})',
                     'sum(pdserve:kv_writes_per_push_count{role="prefill"})',
                     'sum(pdserve:inter_token_latency_seconds_count{role="decode"})',
                     'sum(pdserve:engine_steps_total{role="decode"})'):
            _wait(lambda: (r := _prom_query(port, expr)) and float(r[0]["value"][1]) > 0, 20, expr)
        # Each engine's count of Triton compiles after start-up is there (none on this CPU: it runs no Triton)
        jit = _prom_query(port, "pdserve:jit_compiles_while_serving_total")
        assert {r["metric"]["role"] for r in jit} == {"prefill", "decode"}, jit
        assert all(float(r["value"][1]) == 0 for r in jit), jit
    finally:
        if prom is not None:
            prom.kill(signal.SIGTERM)
        cluster.stop()


# ----------------------------------------------------------------------------- Redis

@pytest.fixture
def redis_url(tmp_path):
    server = _need("redis-server")
    port = free_port()
    proc = Proc([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(tmp_path)], "Ready to accept connections")
    yield f"redis://127.0.0.1:{port}/0"
    proc.kill(signal.SIGTERM)


def _generate(grpc_port: int, i: int, timeout: float = 60):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        req = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=5, ignore_eos=True))
        req.token_ids.ids.extend([7 + i, 9, 11, 2])
        deltas = list(pb_grpc.GenerateStub(ch).Generate(req, timeout=timeout))
    return deltas[-1]


def test_two_routers_share_a_redis_cluster_and_a_dead_decode_node_drops_out(redis_url):
    import redis

    ttl = 2.0
    procs: list[Proc] = []
    try:
        node = ["--redis-url", redis_url, "--heartbeat-ttl", str(ttl), *ENGINE_ARGS]
        procs.append(_pdserve("prefill", "--node-name", "p0", *node, ready="prefill node ready"))
        decode = [_pdserve("decode", "--node-name", f"d{i}", *node, ready="decode node ready") for i in range(2)]
        procs += decode
        routers = []
        for i in range(2):
            grpc_port, http_port = free_port(), free_port()
            procs.append(_pdserve("router", "--model", "tiny-llama", "--redis-url", redis_url, "--grpc-port",
                                  str(grpc_port), "--http-port", str(http_port), "--node-name", f"r{i}",
                                  ready="router ready"))
            routers.append((grpc_port, http_port))

        def health(http_port):
            return json.loads(_get(f"http://127.0.0.1:{http_port}/health"))

        for _, http_port in routers:  # both routers found every node in Redis
            _wait(lambda: health(http_port) == {"status": "ok", "prefill": 1, "decode": 2}, 20, "both decode nodes")
        with cf.ThreadPoolExecutor(8) as pool:
            before = list(pool.map(lambda i: _generate(routers[i % 2][0], i), range(12)))
        assert [d.finish_reason for d in before] == ["length"] * 12

        decode[1].kill()  # SIGKILL: no deregistration, only the TTL removes it
        killed_at = time.monotonic()
        r = redis.Redis.from_url(redis_url)
        _wait(lambda: not r.exists("pdserve:tiny-llama:node:d1"), ttl + 3, "the dead node's registration to expire")
        for _, http_port in routers:
            _wait(lambda: health(http_port)["decode"] == 1, 3, "routers to drop the dead decode node")
        assert time.monotonic() - killed_at < ttl + 4
        with cf.ThreadPoolExecutor(8) as pool:
            after = list(pool.map(lambda i: _generate(routers[i % 2][0], i), range(16)))
        assert [d.finish_reason for d in after] == ["length"] * 16, [d.error for d in after]
        assert r.exists("pdserve:tiny-llama:node:d0") and r.exists("pdserve:tiny-llama:node:p0")
    finally:
        for p in reversed(procs):
            p.kill(signal.SIGTERM)


def test_prefix_summaries_are_shared_between_routers(redis_url):
    """Router A routes a long prompt to a prefill node (prefix-aware policy); a registry that never
    saw the prompt (what router B reads) finds that node's prefix match in Redis, and no other."""
    procs: list[Proc] = []
    try:
        node = ["--redis-url", redis_url, *ENGINE_ARGS]
        for i in range(2):
            procs.append(_pdserve("prefill", "--node-name", f"p{i}", *node, ready="prefill node ready"))
        procs.append(_pdserve("decode", "--node-name", "d0", *node, ready="decode node ready"))
        ports = []
        for i in range(2):
            g, h = free_port(), free_port()
            procs.append(_pdserve("router", "--model", "tiny-llama", "--redis-url", redis_url, "--policy",
                                  "prefix_aware", "--grpc-port", str(g), "--http-port", str(h), ready="router ready"))
            ports.append((g, h))
        import redis

        r = redis.Redis.from_url(redis_url)
        prompt = list(range(10, 58))  # three 16-token blocks
        with grpc.insecure_channel(f"127.0.0.1:{ports[0][0]}") as ch:
            req = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=2, ignore_eos=True))
            req.token_ids.ids.extend(prompt)
            assert list(pb_grpc.GenerateStub(ch).Generate(req, timeout=60))[-1].finish_reason == "length"
        owners = [n for n in ("p0", "p1") if r.zcard(f"pdserve:tiny-llama:prefix:{n}") > 0]
        assert len(owners) == 1
        from router.redis_registry import RedisRegistry
        import asyncio

        async def matches():
            reg = RedisRegistry(redis_url, "tiny-llama")
            try:
                await reg.wait_ready(20)
                return {n.node_id: k for n, k in (await reg.prefix_matches(prompt + [1, 2])).items()}
            finally:
                await reg.close()
        assert asyncio.run(matches()) == {owners[0]: 48, ({"p0", "p1"} - set(owners)).pop(): 0}
    finally:
        for p in reversed(procs):
            p.kill(signal.SIGTERM)


def test_a_node_whose_heartbeat_lapses_finishes_its_requests_before_its_channel_closes(redis_url):
    """A late heartbeat (a busy host) takes the node out of routing at once, but a request this
    router already has on it keeps its stream; the channel closes when the node's last request ends."""
    import asyncio

    import redis
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from node.registration import redis_key
    from router.redis_registry import RedisRegistry

    async def scenario():
        server = grpc.aio.server()  # stands in for the node: a stream that stays open (health Watch)
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        r = redis.Redis.from_url(redis_url)
        key = redis_key("m", "node", "d9")
        info = pb.NodeInfo(role="decode", node_id="d9", incarnation="i1", model="m")
        r.hset(key, mapping={"address": f"127.0.0.1:{port}", "role": "decode", "info": info.SerializeToString()})
        reg = RedisRegistry(redis_url, "m")
        reg.need_prefill = False
        try:
            await reg.wait_ready(10)
            node = reg.by_id["d9"]
            call = health_pb2_grpc.HealthStub(node.channel).Watch(health_pb2.HealthCheckRequest(service=""))
            await call.read()  # the stream is open
            node.in_flight = 1
            r.delete(key)  # the heartbeat lapsed
            await reg.refresh()
            assert reg.of("decode") == [] and node not in reg.nodes  # no new requests go there
            await asyncio.sleep(0.2)
            assert not call.done()  # ... but the one in flight is not cut off
            node.in_flight = 0
            await reg.refresh()
            await asyncio.sleep(0.2)
            assert call.done()  # its last request over, the channel closed
        finally:
            await reg.close()
            await server.stop(0)

    asyncio.run(scenario())
