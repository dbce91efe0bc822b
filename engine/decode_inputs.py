"""The packed inputs of a graph decode step: one host write and one host-to-device copy per step.

A CUDA-graph decode step reads static device tensors: token sources, positions, KV slots,
sequence lengths, block tables and per-row sampling settings. Here they are all views into one
device byte buffer. The host fills a pinned copy of it through numpy views (no torch op per
field) and uploads it with a single non-blocking copy. Two pinned copies take turns, each guarded
by the event of its last upload, so the host never rewrites bytes a pending copy still reads.

The first region, `sampled`, is never uploaded: the graph writes its draws there, and the next
step's token ids are gathered from `[sampled | ids]` by a host-built index (`src`), so patching
the inputs the host has not seen yet (overlap scheduling) is one gather inside the graph.

It owns bytes and their layout only; which tokens go where is the caller's (engine/cuda_graph.py).
"""
from __future__ import annotations

import numpy as np
import torch

_ONE_COPY_BYTES = 256 << 10  # full-width block-table rows up to this size go in the one contiguous copy

# (name, torch dtype, numpy dtype, columns); `sampled` first (device-written), `block_tables` last
# (uploaded only up to the rows in use).
_FIELDS = (
    ("sampled", torch.int64, np.int64, 1),
    ("ids", torch.int64, np.int64, 1),
    ("src", torch.int64, np.int64, 1),
    ("positions", torch.int64, np.int64, 1),
    ("slot_mapping", torch.int64, np.int64, 1),
    ("top_k", torch.int64, np.int64, 1),
    ("temperature", torch.float32, np.float32, 1),
    ("top_p", torch.float32, np.float32, 1),
    ("min_p", torch.float32, np.float32, 1),
    ("seq_lens", torch.int32, np.int32, 1),
    ("greedy", torch.bool, np.bool_, 1),
    ("block_tables", torch.int32, np.int32, None),
)


class DecodeInputs:
    """Device views (`dev.<field>`) and host views (`host().<field>`) of one packed buffer."""

    def __init__(self, max_batch: int, max_pages: int, device: torch.device):
        self.n, self.width, self.device = max_batch, max_pages, device
        self.offsets: dict[str, int] = {}
        off = 0
        for name, tdt, _, cols in _FIELDS:
            off = -(-off // 8) * 8
            self.offsets[name] = off
            off += max_batch * (cols or max_pages) * torch.empty(0, dtype=tdt).element_size()
        self.nbytes = off
        self.upload_from = self.offsets["ids"]
        pin = device.type == "cuda"
        self._dev_bytes = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        self.dev = self._views(self._dev_bytes, on_device=True)
        self._host_bytes = [torch.zeros(self.nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._hosts = [self._views(b, on_device=False) for b in self._host_bytes]
        self._host_tables = [self._views(b, on_device=True).block_tables for b in self._host_bytes]  # torch views
        self._events: list = [None, None]
        self._turn = 0
        self.token_pool = self.dev_int64_span("sampled", 2)  # [sampled | ids]: what `src` indexes
        self.dev.src.copy_(torch.arange(self.n, self.n * 2))
        for h in self._hosts + [self.dev]:  # neutral rows: own host id, one cached position, no KV write
            if h is not self.dev:
                h.src[:] = np.arange(self.n, self.n * 2)
            h.seq_lens[:] = 1
            h.slot_mapping[:] = -1
            h.temperature[:] = 1.0
            h.top_p[:] = 1.0
            h.greedy[:] = True

    def _views(self, buf: torch.Tensor, on_device: bool) -> "_Views":
        out = _Views()
        raw = buf if on_device else buf.numpy()
        for name, tdt, ndt, cols in _FIELDS:
            nb = self.n * (cols or self.width) * torch.empty(0, dtype=tdt).element_size()
            part = raw[self.offsets[name]: self.offsets[name] + nb]
            v = part.view(tdt) if on_device else part.view(ndt)
            setattr(out, name, v.reshape(self.n, self.width) if cols is None else v)
        return out

    def dev_int64_span(self, first: str, count: int) -> torch.Tensor:
        """`count` consecutive int64 fields from `first` on, as one device tensor."""
        start = self.offsets[first]
        return self._dev_bytes[start: start + count * self.n * 8].view(torch.int64)

    def host(self):
        """The pinned copy to fill for the next upload (waits, rarely, for its previous upload)."""
        self._turn ^= 1
        ev = self._events[self._turn]
        if ev is not None:
            ev.synchronize()
        return self._hosts[self._turn]

    def upload(self, rows: int, columns: int) -> None:
        """Copy the filled pinned buffer to the device: every field, and of the block tables the first
        `rows` rows (one contiguous copy while that is small), or only their first `columns` entries
        (a second, strided copy, when full-width rows would be large: long context limits)."""
        tables = self.offsets["block_tables"]
        src = self._host_bytes[self._turn]
        if rows * self.width * 4 <= _ONE_COPY_BYTES:
            end = tables + rows * self.width * 4
            self._dev_bytes[self.upload_from: end].copy_(src[self.upload_from: end], non_blocking=True)
        else:
            self._dev_bytes[self.upload_from: tables].copy_(src[self.upload_from: tables], non_blocking=True)
            self.dev.block_tables[:rows, :columns].copy_(self._host_tables[self._turn][:rows, :columns],
                                                         non_blocking=True)
        if self.device.type == "cuda":
            ev = self._events[self._turn] or torch.cuda.Event()
            ev.record()
            self._events[self._turn] = ev


class _Views:
    """Named views of the packed buffer (attributes as in `_FIELDS`)."""
