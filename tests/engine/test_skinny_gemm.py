"""The skinny GEMM for decode-sized linear layers (engine/kernels/skinny_gemm.py) against `F.linear`
and the FP8 block reference, and the decode GEMM tuner's choice seam (engine/kernels/decode_gemm.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import decode_gemm, skinny_gemm
from engine.layers.linear import dense_linear
from tests.engine.kernel_checks import check_passes_on_cpu, check_passes_on_gpu


def test_skinny_gemm_matches_its_references_for_every_tuner_tiling_under_the_interpreter():
    check_passes_on_cpu("check_skinny_gemm", "small", 11)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_skinny_gemm_matches_its_references_at_real_sizes_on_gpu():
    check_passes_on_gpu("check_skinny_gemm", "real")


def test_tiles_whose_rows_straddle_a_scale_block_are_refused():
    w = torch.empty(64, 64)
    tiles = skinny_gemm.SkinnyTiles(16, 256, 4, 1)
    assert skinny_gemm.supports(1, w, None, tiles)
    assert skinny_gemm.supports(4, w, (16, 32), tiles)
    assert not skinny_gemm.supports(4, w, None, skinny_gemm.SkinnyTiles(16, 1024, 4, 1))  # accumulator would spill
    assert not skinny_gemm.supports(1, w, (8, 32), tiles)  # 16 rows span two 8-row scale blocks
    assert not skinny_gemm.supports(1, w, (16, 384), tiles)  # a 256-column step splits a 384-column block
    assert not skinny_gemm.supports(skinny_gemm.MAX_M + 1, w, None, tiles)
    with pytest.raises(ValueError, match="M=5"):
        skinny_gemm.skinny_gemm(torch.empty(5, 64), w, tiles=tiles)


def test_off_gpu_the_tuner_chooses_without_timing_and_dense_linear_is_f_linear():
    x, w, b = torch.randn(3, 24), torch.randn(10, 24), torch.randn(10)
    assert decode_gemm.choose(x, w) == decode_gemm.CUBLAS
    assert decode_gemm.chosen() == {}
    torch.testing.assert_close(dense_linear(x, w, b), F.linear(x, w, b))
