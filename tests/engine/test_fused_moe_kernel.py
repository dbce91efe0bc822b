"""Triton fused MoE against the torch reference: interpreter on CPU (subprocess), native on GPU."""
from __future__ import annotations

import pytest
import torch

from tests.engine.kernel_checks import check_passes_on_cpu, check_passes_on_gpu


def test_fused_moe_matches_the_reference_under_the_interpreter():
    check_passes_on_cpu("check_fused_moe", "small", 12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_moe_matches_the_reference_at_real_sizes_on_gpu():
    check_passes_on_gpu("check_fused_moe", "real")
