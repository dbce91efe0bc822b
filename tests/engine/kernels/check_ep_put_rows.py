"""The symmetric-memory put kernel (engine/ep/symm_all_to_all.py) against its reference, the
fixed-capacity path's send buffer (`FixedCapacityAllToAll.pack`): two "ranks" emulated in one
process, their buffers' addresses standing in for the peer mappings (interpreter on CPU).
Usage: python -m tests.engine.kernels.check_ep_put_rows [device]"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import torch

from engine.ep.fixed_all_to_all import FixedCapacityAllToAll, RowLayout
from engine.ep.symm_all_to_all import put_rows, put_rows_of_dispatch

WORLD, PER_RANK, H, K = 2, 4, 256, 3


def check_dispatch(device, dtype, fp8: bool, tokens: int, capacity: int, me: int = 1) -> None:
    g = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, H, generator=g).to(device, dtype)
    slots = torch.randint(-1, WORLD * PER_RANK, (tokens, K), generator=g).to(device)
    weights = torch.rand(tokens, K, generator=g).to(device)
    group = SimpleNamespace(size=WORLD, rank=me, device=torch.device(device))
    ref = FixedCapacityAllToAll(group, PER_RANK, fp8=fp8, fp8_group=128).pack(hidden, slots, weights, capacity)
    lay = RowLayout(H, K, dtype, fp8, 128)
    block = capacity * lay.row_bytes
    buffers = [torch.full((WORLD * block + 64,), 0xAB, dtype=torch.uint8, device=device) for _ in range(WORLD)]
    peers = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=device)
    put_rows_of_dispatch(peers, me * block, lay, capacity, hidden, slots, weights, PER_RANK, 128)
    for r in range(WORLD):
        got = buffers[r][me * block: (me + 1) * block].view(capacity, lay.row_bytes)
        assert torch.equal(got, ref[r]), f"dispatch rows for rank {r} differ ({dtype}, fp8={fp8}, {tokens}/{capacity})"
        assert bool((buffers[r][:me * block] == 0xAB).all()), "wrote outside its block"
    print(f"ok dispatch {dtype} fp8={fp8} tokens={tokens} capacity={capacity}")


def check_combine(device, dtype, capacity: int = 5, me: int = 0) -> None:
    partial = torch.randn(WORLD * capacity, H).to(device, dtype)
    row = H * partial.element_size()
    block = capacity * row
    buffers = [torch.zeros(WORLD * block, dtype=torch.uint8, device=device) for _ in range(WORLD)]
    peers = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=device)
    put_rows(peers, me * block, row, capacity, capacity, partial.view(torch.uint8), src_rank_rows=capacity)
    for r in range(WORLD):
        got = buffers[r][me * block: (me + 1) * block].view(dtype).view(capacity, H)
        assert torch.equal(got, partial[r * capacity: (r + 1) * capacity]), f"combine rows for rank {r} differ"
    print(f"ok combine {dtype}")


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    for dtype in (torch.bfloat16, torch.float32):
        check_dispatch(device, dtype, False, 5, 7)  # padding rows
        check_dispatch(device, dtype, False, 6, 6)
        check_dispatch(device, dtype, False, 0, 3)  # an idle rank
        check_combine(device, dtype)
    check_dispatch(device, torch.bfloat16, True, 5, 8)
