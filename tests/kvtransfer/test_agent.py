"""NIXL KV page transfer between two agents (UCX, DRAM; both in this process, real NIXL)."""
from __future__ import annotations

import time

import pytest
import torch

from engine.config import KVCacheSpec
from engine.kv_cache import KVPool
from kvtransfer.agent import KVLayoutMismatch, KVTransferAgent, page_runs


def test_page_runs_coalesce_pages_contiguous_on_both_sides():
    assert page_runs([3, 4, 5, 9], [10, 11, 12, 13]) == [(3, 10, 3), (9, 13, 1)]
    assert page_runs([1, 2], [5, 7]) == [(1, 5, 1), (2, 7, 1)]


def _agent(role, pages=8, page_size=4):
    spec = KVCacheSpec(num_layers=3, page_size=page_size, num_components=2, num_heads=2, head_dim=8,
                       dtype=torch.float32, kind="gqa")
    pool = KVPool(spec, pages, "cpu")
    return KVTransferAgent(role, pool.layers, spec.describe(), spec.page_bytes), pool


def _wait(agent, transfer, receiver=None, timeout=10.0):
    """Poll the WRITE; DRAM agents have no progress thread, so the receiver is polled too (as the
    decode engine loop does while a reservation waits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = agent.poll(transfer)
        if state != "PROC":
            return state
        if receiver is not None:
            assert receiver.notifications() == []
    return "TIMEOUT"


def test_pages_land_in_the_reserved_pages_layer_by_layer_and_the_notification_names_the_request():
    sender, src = _agent("prefill")
    receiver, dst = _agent("decode")
    for layer in src.layers:
        layer.copy_(torch.randn_like(layer))
    dest = dict(receiver.destination(), page_ids=[6, 2, 3], incarnation="x")
    for layer in range(3):
        assert _wait(sender, sender.write("r1", [0, 1, 2], dest, layers=[layer]), receiver) == "DONE"
    sender.notify(dest, b"r1")
    deadline = time.monotonic() + 10
    notes = []
    while not notes and time.monotonic() < deadline:
        notes = receiver.notifications()
    assert notes == [b"r1"]
    for s_layer, d_layer in zip(src.layers, dst.layers):
        assert torch.equal(d_layer[[6, 2, 3]], s_layer[[0, 1, 2]])
        assert d_layer[[0, 1, 4, 5, 7]].abs().sum() == 0  # nothing else touched


def test_different_page_sizes_are_refused_with_the_reason():
    sender, _ = _agent("prefill", page_size=4)
    receiver, _ = _agent("decode", page_size=8)
    dest = dict(receiver.destination(), page_ids=[0], incarnation="y")
    with pytest.raises(KVLayoutMismatch, match="page_size: ours 4 vs theirs 8"):
        sender.write("r2", [0], dest)


def test_a_prompt_after_interleaved_decodes_pushes_as_one_run_per_layer():
    """Both nodes' allocators keep a new prompt's pages consecutive even after decode steps interleaved
    other sequences' pages (engine/block_pool.py), so the push's WRITE has one descriptor per layer
    rather than one per page (2,800-3,600 per 2k-token DeepSeek-V2-Lite push with a FIFO free list,
    which handed the finished sequences' pages out in the order they were freed)."""
    from engine.block_pool import BlockPool

    pools = []
    for _ in range(2):
        pool = BlockPool(130)
        seqs = [[] for _ in range(4)]
        for _ in range(30):  # decode steps of four sequences, one page each in turn
            for s in seqs:
                s += pool.allocate(1)
        other = pool.allocate(10)  # the rest of the pool, held
        for s in seqs[::2] + seqs[1::2]:
            pool.decref(s)  # all four finish, evens first: pages 0-119 free again
        pools.append((pool, other))
    local, remote = (pool.allocate(100) for pool, _ in pools)  # a 1,600-token prompt, 16-token pages
    assert page_runs(local, remote) == [(local[0], remote[0], 100)]
