"""The decode-path Triton kernels compile for an H100/H200 (sm_90) down to a cubin on this CPU-only
machine (tests/engine/kernels/compile_sm90.py): the interpreter tests check their arithmetic, this checks
what only the compiler sees (globals read from compiled code, shapes it refuses, ptxas limits)."""
from __future__ import annotations

import os

import pytest
import triton

from tests.engine.test_attention_kernels import _run

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton wheel ships no ptxas")
@pytest.mark.parametrize("check", ["check_skinny_gemm", "check_moe_decode_fp8"])
def test_decode_kernels_compile_for_sm90(check):
    r = _run(["-m", "tests.engine.kernels.compile_sm90", f"tests.engine.kernels.{check}", "cpu", "small"],
             interpret=False, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " 0 failed" in r.stdout and "specializations compiled" in r.stdout


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton wheel ships no ptxas")
def test_attention_kernels_compile_at_a_tiny_models_rope_width():
    """Rope width 8 (tiny DeepSeek presets): the second query/key part is padded to a dot's K of 16
    (these launches failed to compile before, so tiny MLA models could not run on a GPU)."""
    r = _run(["-m", "tests.engine.kernels.compile_sm90", "tests.engine.kernels.tiny_rope_shapes"],
             interpret=False, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "_mla_decode_kernel" in r.stdout and "_prefill_kernel" in r.stdout
    assert " 0 failed" in r.stdout and "specializations compiled" in r.stdout
