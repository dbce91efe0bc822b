"""The PDL switch (engine/kernels/pdl.py): off on CPU, inside `disabled()` (nested too) and with
`PDSERVE_PDL=0`; what a participating kernel is launched with in each case. (The kernels' PDL variants
compile for sm_90 in tests/engine/test_kernels_compile_sm90.py; they run only on a GPU.)"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from engine.kernels import pdl

CUDA = torch.device("cuda", 0)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_off_on_cpu_and_inside_disabled(monkeypatch):
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.launch_args(torch.device("cpu")) == {"USE_PDL": False}
    monkeypatch.setattr(pdl, "_ENV_OFF", False)
    monkeypatch.setattr(pdl, "_capable", lambda index: True)  # an sm_90 stand-in: no GPU here
    assert pdl.launch_args(CUDA) == {"USE_PDL": True, "launch_pdl": True}
    assert pdl.launch_args(CUDA, tokens=pdl.DECODE_MAX_TOKENS) == {"USE_PDL": True, "launch_pdl": True}
    assert pdl.launch_args(CUDA, tokens=pdl.DECODE_MAX_TOKENS + 1) == {"USE_PDL": False}  # prefill: plain
    with pdl.disabled():
        with pdl.disabled():
            assert not pdl.enabled(CUDA)
        assert not pdl.enabled(CUDA)
    assert pdl.enabled(CUDA)
    assert pdl.disabled()(lambda: pdl.enabled(CUDA))() is False and pdl.enabled(CUDA)


def test_the_environment_turns_it_off():
    code = "from engine.kernels import pdl; print(pdl._ENV_OFF, pdl.launch_args(__import__('torch').device('cuda')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PATH": "/usr/bin:/bin", "PDSERVE_PDL": "0"})
    assert out.stdout.strip() == "True {'USE_PDL': False}", out.stdout + out.stderr
