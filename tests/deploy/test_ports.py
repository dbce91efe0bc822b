"""`free_port` (engine/ports.py): a port it hands out is free, never handed out twice by one process,
and never one the caller names as promised elsewhere (the launcher passes the router's ports, which the
`pdserve up` command line fixed before the node ports are picked): two picks before either server
binds could otherwise collide, and the later server fails to start."""
from __future__ import annotations

import socket

from engine.ports import free_port


def test_ports_are_free_and_never_handed_out_twice():
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    for p in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free to listen on


def test_excluded_ports_are_avoided():
    promised = set(range(20000, 31980))  # all of the low range but twenty ports
    port = free_port(exclude=promised)
    assert port not in promised and (31980 <= port < 32000 or port >= 32768)
