"""Triton fused MoE against the torch reference: interpreter on CPU (subprocess), native on GPU."""
from __future__ import annotations

import pytest
import torch

from tests.engine.test_attention_kernels import _run


def test_fused_moe_matches_the_reference_under_the_interpreter():
    r = _run(["-m", "tests.engine.kernels.check_fused_moe", "cpu", "small"], interpret=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_moe_matches_the_reference_at_real_sizes_on_gpu():
    r = _run(["-m", "tests.engine.kernels.check_fused_moe", "cuda", "real"], interpret=False, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
