"""The Triton GEMV of batch-1 decode projections against `F.linear`: under the interpreter on CPU
(subprocess), at Qwen3-8B / Llama-3-8B sizes on GPU; and the layer seam keeps `F.linear` off CUDA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers import fused_ops
from tests.engine.test_attention_kernels import _run


def test_gemv_matches_linear_under_the_interpreter():
    r = _run(["-m", "tests.engine.kernels.check_gemv", "cpu", "small"], interpret=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 12 and "BAD" not in r.stdout


def test_linear_seam_is_f_linear_on_cpu():
    x, w, b = torch.randn(1, 8), torch.randn(5, 8), torch.randn(5)
    assert torch.equal(fused_ops.linear(x, w), F.linear(x, w))
    assert torch.equal(fused_ops.linear(x, w, b), F.linear(x, w, b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gemv_matches_linear_at_real_sizes_on_gpu():
    r = _run(["-m", "tests.engine.kernels.check_gemv", "cuda", "real"], interpret=False, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
