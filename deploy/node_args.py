"""The flags of `pdserve prefill|decode`: the engine settings (derived from engine/config.py) and the
node's own. `node_parser` checks the argv a deployment (Ray config, Helm chart) gives its nodes."""
from __future__ import annotations

import argparse

from engine.engine_args import add_engine_args


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def node_parser() -> argparse.ArgumentParser:
    """The node commands' flags, raising ValueError (naming the flag) where argparse would exit."""
    p = _RaisingParser(prog="pdserve prefill|decode", add_help=False, allow_abbrev=False)
    add_node_args(p)
    return p


def add_node_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, node=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    o = p.add_argument_group("operations")
    o.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics and /health over HTTP on this port (0: any free port)")
    o.add_argument("--redis-url", default=None,
                   help="register in this Redis (redis://host:port/db) with expiring heartbeats, so routers "
                        "find this node without --prefill/--decode lists")
    o.add_argument("--node-name", default=None, help="this node's name in metrics and the registry "
                                                     "(default: role-<random>)")
    o.add_argument("--advertise-host", default=None,
                   help="host routers should dial (default: --host, or this machine's name when --host is 0.0.0.0)")
    o.add_argument("--heartbeat-ttl", type=float, default=3.0,
                   help="seconds a Redis registration lives without a heartbeat (heartbeats every TTL/3)")
    o.add_argument("--slo", default=None, help="SLO targets as extra histogram buckets: 'ttft:1000 tpot:50' (ms)")
    add_tls_args(p)


def add_tls_args(p: argparse.ArgumentParser) -> None:
    """TLS flags of the node commands (also taken by the router and `up`, which forwards them)."""
    t = p.add_argument_group("TLS")
    t.add_argument("--tls-cert", default=None, help="this process's certificate (PEM): TLS on its gRPC/HTTP endpoints")
    t.add_argument("--tls-key", default=None, help="the private key of --tls-cert (PEM)")
    t.add_argument("--tls-ca", default=None, help="the cluster CA (PEM): nodes accept only clients with a certificate "
                                                  "it signed, and the router verifies nodes against it (mutual TLS)")
