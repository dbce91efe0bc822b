"""Triton FP8 kernels (activation quantization, block GEMM, fused MoE, decode MoE) against their torch
references: interpreter on CPU (subprocess), native on GPU."""
from __future__ import annotations

import pytest
import torch

from tests.engine.kernel_checks import check_passes_on_cpu, check_passes_on_gpu


def test_fp8_kernels_match_their_references_under_the_interpreter():
    check_passes_on_cpu("check_fp8", "small", 21)


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
