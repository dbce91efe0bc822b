"""Triton FP8 kernels (activation quantization, block GEMM, fused MoE, decode MoE) against their torch
references: interpreter on CPU (subprocess), native on GPU."""
from __future__ import annotations

import pytest
import torch

from tests.engine.test_attention_kernels import _run


def test_fp8_kernels_match_their_references_under_the_interpreter():
    r = _run(["-m", "tests.engine.kernels.check_fp8", "cpu", "small"], interpret=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 19


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_kernels_match_their_references_at_real_sizes_on_gpu():
    r = _run(["-m", "tests.engine.kernels.check_fp8", "cuda", "real"], interpret=False, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fp8_decode_moe_kernels_match_the_reference_under_the_interpreter():
    r = _run(["-m", "tests.engine.kernels.check_moe_decode_fp8", "cpu", "small"], interpret=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 13


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_decode_moe_kernels_match_the_reference_at_deepseek_v2_lite_sizes_on_gpu():
    r = _run(["-m", "tests.engine.kernels.check_moe_decode_fp8", "cuda", "v2lite"], interpret=False, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_triton_attention_over_an_fp8_kv_cache_matches_the_reference_under_the_interpreter():
    r = _run(["-m", "tests.engine.kernels.check_fp8_kv", "cpu"], interpret=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 4
