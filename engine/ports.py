"""Picking a free TCP port for a server this process is about to start (an engine rank's
torch.distributed rendezvous, a node's gRPC or metrics port chosen by the local launcher)."""
from __future__ import annotations

import random
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port free to listen on now, picked below Linux's ephemeral range (32768+): a port the
    kernel hands out with bind(0) can be taken by any outgoing connection before our server
    binds it."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded low range: fall back to the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]
