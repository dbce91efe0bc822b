"""TLS on the router's public gRPC and HTTP endpoints and mutual TLS between router and nodes, with
certificates made here: a request is served end to end, and a node refuses clients that lack a
certificate signed by the cluster CA."""
from __future__ import annotations

import ssl

import grpc
import pytest

from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from tests.cluster.conftest import Cluster
from tests.router.certs import make_ca_and_leaf


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    return make_ca_and_leaf(d, "cluster"), make_ca_and_leaf(d, "rogue")


@pytest.fixture(scope="module")
def cluster(certs):
    own, _ = certs
    c = Cluster(extra=["--tls-cert", own["cert"], "--tls-key", own["key"], "--tls-ca", own["ca"]])
    yield c
    c.stop()


def _node_addresses(cluster) -> list[tuple[str, str]]:
    out = []
    for line in cluster.lines:
        if "node ready on" in line:
            out.append((line.split("]")[1].split()[0], line.strip().split()[-1]))
    return out


@pytest.mark.slow
def test_https_and_tls_grpc_serve_a_request_end_to_end(cluster, certs):
    from openai import DefaultHttpx2Client, OpenAI

    own, _ = certs
    assert "https://" in "".join(cluster.lines)
    assert any("prefill0 loading tiny-llama" in line for line in cluster.lines)  # `up` says who loads what
    http = DefaultHttpx2Client(verify=ssl.create_default_context(cafile=own["ca"]))
    client = OpenAI(base_url=f"https://127.0.0.1:{cluster.http_port}/v1", api_key="none", http_client=http,
                    max_retries=0)
    out = client.completions.create(model="tiny-llama", prompt=[5, 6, 7], max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3
    creds = grpc.ssl_channel_credentials(root_certificates=_read(own["ca"]))
    with grpc.secure_channel(f"127.0.0.1:{cluster.grpc_port}", creds) as ch:
        req = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True))
        req.token_ids.ids.extend([5, 6, 7])
        deltas = list(pb_grpc.GenerateStub(ch).Generate(req, timeout=60))
    assert [t for d in deltas for t in d.token_ids] == out.model_extra["token_ids"]
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as ch:  # plaintext to a TLS port fails
        with pytest.raises(grpc.RpcError):
            list(pb_grpc.GenerateStub(ch).Generate(req, timeout=10))


@pytest.mark.slow
def test_nodes_refuse_clients_without_the_cluster_certificate(cluster, certs):
    own, rogue = certs
    nodes = _node_addresses(cluster)
    assert {role for role, _ in nodes} == {"prefill", "decode"}
    stubs = {"prefill": pb_grpc.PrefillNodeStub, "decode": pb_grpc.DecodeNodeStub}
    for role, addr in nodes:
        member = grpc.ssl_channel_credentials(_read(own["ca"]), _read(own["key"]), _read(own["cert"]))
        with grpc.secure_channel(addr, member) as ch:
            assert stubs[role](ch).Info(pb.InfoRequest(), timeout=10).role == role
        for creds in (grpc.ssl_channel_credentials(_read(own["ca"])),  # TLS, but no client certificate
                      grpc.ssl_channel_credentials(_read(own["ca"]), _read(rogue["key"]), _read(rogue["cert"]))):
            with grpc.secure_channel(addr, creds) as ch:
                with pytest.raises(grpc.RpcError) as e:
                    stubs[role](ch).Info(pb.InfoRequest(), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(addr) as ch:
            with pytest.raises(grpc.RpcError):
                stubs[role](ch).Info(pb.InfoRequest(), timeout=10)


@pytest.mark.slow
def test_router_registry_trusts_only_nodes_the_cluster_ca_signed(cluster, certs):
    """The router's own probes: with the cluster's certificate and CA a node answers; a router that
    trusts another CA (as the cluster's router sees a node with a foreign certificate) refuses it."""
    import asyncio

    from node.grpc_server import TLSFiles
    from router.registry import Registry

    own, rogue = certs
    decode = [addr for role, addr in _node_addresses(cluster) if role == "decode"]

    async def alive(tls) -> bool:
        reg = Registry([], decode, tls)
        await reg.refresh()
        ok = all(n.alive for n in reg.nodes)
        for n in reg.nodes:
            await n.channel.close()
        return ok

    assert asyncio.run(alive(TLSFiles(own["cert"], own["key"], own["ca"])))
    assert not asyncio.run(alive(TLSFiles(own["cert"], own["key"], rogue["ca"])))  # node's cert not trusted
    assert not asyncio.run(alive(TLSFiles(rogue["cert"], rogue["key"], own["ca"])))  # our cert not accepted
