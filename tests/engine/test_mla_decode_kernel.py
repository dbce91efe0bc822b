"""The Triton MLA decode kernel against its torch reference and the torch attention backend: under
TRITON_INTERPRET=1 on CPU at small sizes (in a subprocess, so the interpreter setting stays out of
this process), and natively at DeepSeek-V3 / V2-Lite sizes, with a CUDA graph replay, on a GPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from engine.kernels.mla_decode import choose_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check(device: str, size: str, interpret: bool):
    env = dict(os.environ, PYTHONPATH=ROOT)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "tests.engine.kernels.check_mla_decode", device, size], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_mla_decode_matches_the_references_under_the_interpreter():
    r = _check("cpu", "small", interpret=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 6, r.stdout


def test_config_depends_on_static_shapes_and_covers_all_heads():
    cpu = torch.device("cpu")
    for heads in (1, 16, 20, 128):
        for batch in (1, 3, 64, 128):
            cfg = choose_config(batch, heads, cpu)
            assert cfg == choose_config(batch, heads, cpu)
            assert cfg.block_h >= 16 and cfg.num_splits >= 1
            assert cfg.block_h * -(-heads // cfg.block_h) >= heads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mla_decode_matches_the_references_at_real_sizes_on_gpu():
    r = _check("cuda", "real", interpret=False)
    assert r.returncode == 0, r.stdout + r.stderr
