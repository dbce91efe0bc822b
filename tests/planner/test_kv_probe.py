"""The profile's KV transfer table times what the product's push does: one WRITE per layer (one
descriptor per contiguous run) from this process into a KV pool owned by another process, over real
NIXL (UCX, DRAM on CPU); each row is the whole transfer of `n` pages of every layer."""
from __future__ import annotations

import pytest
import torch

from engine.config import KVCacheSpec

agent_mod = pytest.importorskip("kvtransfer.agent")
try:
    agent_mod._nixl_api()
except ImportError:
    pytest.skip("NIXL is not installed", allow_module_level=True)

from kvtransfer.agent import KVTransferAgent  # noqa: E402
from planner.kv_probe import measure_kv_transfer  # noqa: E402

SPEC = KVCacheSpec(num_layers=3, page_size=4, num_components=2, num_heads=2, head_dim=8, dtype=torch.float32,
                   kind="gqa")


def test_kv_table_times_one_write_per_layer_into_another_process(monkeypatch):
    local_agents, writes = [], []
    init, write = KVTransferAgent.__init__, KVTransferAgent.write

    def spy_init(self, *a, **kw):
        init(self, *a, **kw)
        local_agents.append(self.name)

    def spy_write(self, request_id, local_pages, dest, notif=b"", layers=None, runs=None):
        t = write(self, request_id, local_pages, dest, notif, layers, runs)
        writes.append((len(local_pages), layers, t.num_descs, dest["agent_name"]))
        return t

    monkeypatch.setattr(KVTransferAgent, "__init__", spy_init)
    monkeypatch.setattr(KVTransferAgent, "write", spy_write)
    repeats = 2
    table = measure_kv_transfer(SPEC, torch.device("cpu"), [1, 8], repeats)
    assert table is not None
    assert table["bytes"] == [n * SPEC.page_bytes * SPEC.num_layers for n in (1, 8)]
    assert all(s > 0 for s in table["seconds"])
    assert "two processes" in table["path"] and "one WRITE per layer" in table["path"]
    assert len(local_agents) == 1  # the sender only: the receiving agent lives in the other process
    assert len(writes) == 2 * (repeats + 1) * SPEC.num_layers
    for n, layers, num_descs, target in writes:
        assert len(layers) == 1 and num_descs == 1 and target not in local_agents
    per_size = (repeats + 1) * SPEC.num_layers
    assert [w[0] for w in writes] == [1] * per_size + [8] * per_size


def test_kv_table_is_none_when_the_receiver_cannot_start():
    import planner.kv_probe as probe

    assert probe.measure_kv_transfer(SPEC, torch.device("cpu"), [1], 1, start_timeout_s=0.0) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vram_table_is_a_gpu_path_not_a_host_relay():
    """VRAM→VRAM on one GPU between two processes goes GPU to GPU (cuda_ipc): far above the 0.48 GB/s
    that two agents in one process got on an H200 (UCX's host relay). Not yet run on a device."""
    spec = KVCacheSpec(num_layers=36, page_size=16, num_components=2, num_heads=8, head_dim=128,
                       dtype=torch.bfloat16, kind="gqa")  # Qwen3-8B's KV page
    table = measure_kv_transfer(spec, torch.device("cuda", 0), [256], 3)
    assert table is not None and "VRAM→VRAM" in table["path"]
    assert table["bytes"][0] / table["seconds"][0] > 20e9
