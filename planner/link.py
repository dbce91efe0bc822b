"""Links between simulated GPUs: bandwidth + latency per hop, and the layer-wise KV push of a
prefill step over one.

Presets (per GPU, one direction, what a transfer of one request can expect — not the marketing
peak): NVLink 4 inside an H100/H200 host ~360 GB/s of 450; PCIe Gen5 x16 ~50 GB/s of 64; RDMA
400 Gb/s (one ConnectX-7 per GPU) ~45 GB/s of 50. Latencies are per transfer (descriptor post,
completion), not wire time. A profile's measured KV transfer table replaces the formula for the
path it measured (`measured`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s
    latency: float  # s per transfer

    def time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth if nbytes > 0 else 0.0


LINKS = {
    "nvlink": Link("nvlink", 360e9, 10e-6),
    "pcie": Link("pcie", 50e9, 15e-6),
    "rdma": Link("rdma", 45e9, 25e-6),
}


def parse_link(spec: str) -> Link:
    """`nvlink`, `pcie`, `rdma`, or `NAME:GBPS:US` (bandwidth in GB/s, latency in microseconds)."""
    if spec in LINKS:
        return LINKS[spec]
    try:
        name, gbps, us = spec.split(":")
        return Link(name, float(gbps) * 1e9, float(us) * 1e-6)
    except ValueError:
        raise ValueError(f"bad link {spec!r}; expected one of {sorted(LINKS)} or NAME:GBPS:US") from None


class Channel:
    """One sender's egress over a link: transfers queue FIFO (one NIC or NVLink port per GPU)."""

    def __init__(self, link: Link, measured=None):
        self.link = link
        self.measured = measured  # bytes -> seconds from a profile (the path it measured), or None
        self.busy_until = 0.0
        self.bytes_sent = 0

    def cost(self, nbytes: float) -> float:
        return self.measured(nbytes) if self.measured else self.link.time(nbytes)

    def push_layers(self, step_start: float, step_time: float, nbytes: float, num_layers: int) -> float:
        """KV of one prefill step pushed layer by layer while the step computes: layer i's WRITE
        may start when that layer's compute ends (step_start + (i+1)·step_time/L) and when the
        previous WRITE on this channel is done. Returns when the last byte lands."""
        if nbytes <= 0:
            return step_start + step_time
        per_layer_bytes = nbytes / num_layers
        # A measured table is end-to-end for a whole transfer; spread it evenly over the layers.
        per_layer = self.cost(nbytes) / num_layers if self.measured else self.link.time(per_layer_bytes)
        t = self.busy_until
        layer_time = step_time / num_layers
        for i in range(num_layers):
            t = max(t, step_start + (i + 1) * layer_time) + per_layer
        self.busy_until = t
        self.bytes_sent += nbytes
        return t
