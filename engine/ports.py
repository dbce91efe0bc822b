"""Picking a free TCP port for a server this process is about to start (an engine rank's
torch.distributed rendezvous, a node's gRPC or metrics port chosen by the local launcher)."""
from __future__ import annotations

import random
import socket
from collections.abc import Iterable

_handed: set[int] = set()  # ports this process has handed out: free now, but promised to a server


def free_port(host: str = "127.0.0.1", exclude: Iterable[int] = ()) -> int:
    """A port free to listen on now, picked below Linux's ephemeral range (32768+): a port the
    kernel hands out with bind(0) can be taken by any outgoing connection before our server
    binds it. Never one this process handed out before, nor one in `exclude` (ports another
    process was given for its servers, e.g. the router's on a `pdserve up` command line): a port is
    free until its server binds it, so two picks before either binds could otherwise collide."""
    rng = random.SystemRandom()
    taken = _handed | set(exclude)
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _handed.add(port)
            return port
    with socket.socket() as s:  # a crowded low range: fall back to the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]
