"""Triton paged attention against the torch reference: under TRITON_INTERPRET=1 on CPU at small
sizes (in a subprocess, so the interpreter setting stays out of this process), and natively at
real model sizes when a GPU is present."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, interpret: bool, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_kernels_match_the_reference_under_the_interpreter():
    r = _run(["-m", "tests.engine.kernels.check_attention", "cpu", "small"], interpret=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 7


_ENGINE_CHECK = """
from engine import LLM, SamplingParams
prompts = [[5, 17, 300, 42, 7, 99, 1000, 3, 8], [11, 12], list(range(400, 422))]
sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
for model in ("tiny-qwen3", "tiny-deepseek-v3"):
    outs = []
    for backend in ("torch", "triton"):
        llm = LLM(model, load_format="dummy", page_size=4, num_pages=64, attention_backend=backend,
                  max_num_batched_tokens=16)
        outs.append([o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)])
    assert outs[0] == outs[1], (model, outs)
    print("same", model)
"""


def test_engine_gives_the_same_tokens_with_the_triton_backend():
    r = _run(["-c", _ENGINE_CHECK], interpret=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("same") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_match_the_reference_at_real_sizes_on_gpu():
    r = _run(["-m", "tests.engine.kernels.check_attention", "cuda", "real"], interpret=False, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
