"""Launches the paged decode / prefill kernels and the MLA decode kernel at a tiny DeepSeek model's MLA
shapes (latent 32, rope 8): a rope width under 16 is below a tensor-core dot's K, which only the GPU
compiler refuses. For `compile_sm90` (no results are checked here; the interpreter tests check them):

    python -m tests.engine.kernels.compile_sm90 tests.engine.kernels.tiny_rope_shapes
"""
from __future__ import annotations

import torch

from engine.kernels import mla_decode, paged_attention


def main() -> None:
    dt = torch.bfloat16
    r, p, h, page = 32, 8, 4, 4
    kv = torch.zeros(16, 1, page, 1, r + p, dtype=dt)
    tables = torch.arange(8, dtype=torch.int32).view(2, 4)
    seq_lens = torch.tensor([5, 9], dtype=torch.int32)
    q = torch.zeros(2, h, r + p, dtype=dt)
    paged_attention.decode_attention(q, kv, tables, seq_lens, 0.1, 0, 0, r, p, torch.zeros(2, h, r, dtype=dt))
    starts = torch.tensor([0, 3, 7], dtype=torch.int32)
    paged_attention.prefill_attention(torch.zeros(7, h, r + p, dtype=dt), kv, tables, seq_lens, starts, 0, 2, 4, 0.1,
                                      0, 0, r, p, torch.zeros(7, h, r, dtype=dt))
    mla_decode.mla_decode(q, kv, tables, seq_lens, 0.1, r)


if __name__ == "__main__":
    main()
