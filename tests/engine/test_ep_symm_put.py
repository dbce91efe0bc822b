"""The symmetric-memory EP transport's put kernel writes exactly the fixed-capacity path's rows
(its reference, `FixedCapacityAllToAll.pack`) into every peer's block, padding and idle ranks
included: interpreter on CPU (subprocess), native on one GPU (local buffers as the peers)."""
from __future__ import annotations

import pytest
import torch

from tests.engine.test_attention_kernels import _run


def test_put_rows_writes_the_fixed_path_rows_under_the_interpreter():
    r = _run(["-m", "tests.engine.kernels.check_ep_put_rows", "cpu"], interpret=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_put_rows_writes_the_fixed_path_rows_on_gpu():
    r = _run(["-m", "tests.engine.kernels.check_ep_put_rows", "cuda"], interpret=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 9


def test_symm_backend_refuses_cpu_ranks_with_a_clear_error():
    from types import SimpleNamespace

    from engine.ep.symm_all_to_all import SymmetricMemoryAllToAll

    group = SimpleNamespace(size=2, rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="needs CUDA"):
        SymmetricMemoryAllToAll(group, 4, 64, 2, 8, torch.float32)
