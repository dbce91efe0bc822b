"""Running a kernel check script (tests/engine/kernels/check_*.py) from a test: under the Triton
interpreter on CPU, or natively on a GPU, in a subprocess so the interpreter setting stays out of this
process; the script prints one `ok ` / `BAD` line per case and exits non-zero on any `BAD`."""
from __future__ import annotations

from tests.engine.test_attention_kernels import _run


def check_passes_on_cpu(check: str, size: str, expected_ok: int) -> None:
    r = _run(["-m", f"tests.engine.kernels.{check}", "cpu", size], interpret=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == expected_ok, r.stdout


def check_passes_on_gpu(check: str, size: str) -> None:
    r = _run(["-m", f"tests.engine.kernels.{check}", "cuda", size], interpret=False, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
