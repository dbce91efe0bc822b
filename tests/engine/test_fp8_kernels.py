"""Triton FP8 kernels (activation quantization, block GEMM, fused MoE, decode MoE) against their torch
references: interpreter on CPU (subprocess), native on GPU."""
from __future__ import annotations

import pytest
import torch

from tests.engine.kernel_checks import check_passes_on_cpu, check_passes_on_gpu


def test_fp8_kernels_match_their_references_under_the_interpreter():
    check_passes_on_cpu("check_fp8", "small", 25)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_kernels_match_their_references_at_real_sizes_on_gpu():
    check_passes_on_gpu("check_fp8", "real")


def test_fp8_decode_moe_kernels_match_the_reference_under_the_interpreter():
    check_passes_on_cpu("check_moe_decode_fp8", "small", 13)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_decode_moe_kernels_match_the_reference_at_deepseek_v2_lite_sizes_on_gpu():
    check_passes_on_gpu("check_moe_decode_fp8", "v2lite")


def test_triton_attention_over_an_fp8_kv_cache_matches_the_reference_under_the_interpreter():
    check_passes_on_cpu("check_fp8_kv", "small", 4)


def test_the_tuner_offers_cublas_block_scaled_fp8_only_where_the_weight_fits_it():
    """cuBLAS's block-scaled GEMM (`decode_gemm.SCALED_MM`) is a candidate at decode and prefill sizes for
    W8A8 weights in 128x128 blocks whose K-block count is a multiple of 4; weight-only FP8, other block
    sizes and DeepSeek-V2-Lite's 1,408-wide expert K are left to the Triton kernels. Above DECODE_MAX_M
    the Triton candidates are the two prefill tilings."""
    from engine.kernels import decode_gemm
    from engine.kernels.fp8_gemm import GemmTiles
    from engine.quantization import quantize_blocks

    w8, ws = quantize_blocks(torch.randn(256, 512), (128, 128))
    for m in (1, 64, 2048):
        assert decode_gemm.SCALED_MM in decode_gemm.candidates(m, w8, ws, (128, 128), True)
    assert decode_gemm.SCALED_MM not in decode_gemm.candidates(1, w8, ws, (128, 128), False)
    w16, s16 = quantize_blocks(torch.randn(256, 512), (16, 32))
    assert decode_gemm.SCALED_MM not in decode_gemm.candidates(64, w16, s16, (16, 32), True)
    wk, sk = quantize_blocks(torch.randn(256, 1408), (128, 128))
    assert decode_gemm.SCALED_MM not in decode_gemm.candidates(512, wk, sk, (128, 128), True)
    prefill = decode_gemm.candidates(512, w8, ws, (128, 128), True)
    assert [c for c in prefill if isinstance(c, GemmTiles)] == decode_gemm.prefill_fp8_candidates(512, 256, 512)
    assert all(isinstance(c, GemmTiles) and not c.fuse_quant for c in decode_gemm.prefill_fp8_candidates(512, 256, 512))
    assert decode_gemm.gated_fused(decode_gemm.SCALED_MM)
