"""engine/kernels/jit_watch.py: Triton's JIT hooks chained, and a slow compile after start-up logged.
Triton compiles nothing on this CPU machine, so the hooks are called as Triton's JIT calls them
(keyword arguments `key`, `repr`, `fn`, ...), not through a real compile."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

triton = pytest.importorskip("triton")
from triton import knobs  # noqa: E402

from engine.kernels import jit_watch  # noqa: E402


@pytest.fixture
def hooks(monkeypatch):
    """Triton's hook knobs with a stand-in earlier hook pair; restored afterwards."""
    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: seen.append(("cache", kw["repr"])) or False)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append(("post", kw["repr"])))
    monkeypatch.setattr(jit_watch, "_serving", False)
    monkeypatch.setattr(jit_watch, "compiles_while_serving", 0)
    jit_watch.install()
    jit_watch.install()  # idempotent: one layer of ours
    return seen


def _compile(repr_: str, seconds: float, monkeypatch) -> object:
    clock = iter([100.0, 100.0 + seconds])
    monkeypatch.setattr(jit_watch.time, "monotonic", lambda: next(clock))
    kw = dict(key=(), repr=repr_, fn=SimpleNamespace(name=repr_.split("[")[0], module="m"), compile={},
              is_manual_warmup=False, already_compiled=False)
    skip = knobs.runtime.jit_cache_hook(**kw)
    knobs.runtime.jit_post_compile_hook(**kw)
    return skip


def test_only_slow_compiles_after_start_up_are_logged_and_earlier_hooks_still_run(hooks, monkeypatch, caplog):
    with caplog.at_level("WARNING", logger="engine.kernels.jit_watch"):
        assert not _compile("_fused_moe[w4](a: *bf16)", 3.0, monkeypatch)  # start-up: not logged
        jit_watch.serving()
        _compile("_norm[w4](x: *bf16)", 0.05, monkeypatch)  # a disk-cache hit: not logged
        _compile("_grouped_gemm[w8](num_slots: i32)", 2.5, monkeypatch)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "_grouped_gemm while serving: 2.50 s" in lines[0] and "num_slots: i32" in lines[0]
    assert jit_watch.compiles_while_serving == 1
    # the hooks that were there before ours ran for every compile, in order
    assert [k for k, _ in hooks] == ["cache", "post"] * 3


def test_an_earlier_hook_that_skips_the_compile_still_decides(hooks, monkeypatch):
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", None)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", None)
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: True)
    jit_watch.install()
    assert _compile("k[w4]()", 0.0, monkeypatch) is True


def test_token_count_arguments_of_the_eager_prefill_kernels_are_not_specialized():
    """Triton specializes an integer argument on `== 1` and divisibility by 16, so a prefill of an odd
    token count compiled new variants of the MoE alignment scan and the grouped GEMM while serving
    (0.4-0.8 s each, logged by jit_watch on an H100, bench/results/2026-12-07m_h100_fp8_prefill.md). The
    token counts of the kernels that run eagerly at any step size are left unspecialized."""
    from engine.kernels import fp8_gemm, fused_moe, fused_moe_fp8, moe_routing, paged_attention, rope_kv

    expected = {
        fp8_gemm._quantize_rows_kernel: {"m", "m_out"}, fp8_gemm._fp8_gemm_kernel: {"m"},
        fused_moe._grouped_gemm_kernel: {"num_slots"}, fused_moe_fp8._grouped_fp8_gemm_kernel: {"num_slots"},
        moe_routing._chunk_count_kernel: {"n"}, moe_routing._scatter_kernel: {"n"},
        moe_routing._scan_kernel: {"n", "num_chunks", "num_blocks", "max_padded"},
        rope_kv._mla_absorbed_query_kernel: {"num_tokens"},
        paged_attention._prefill_kernel: {"seq_offset"},  # the decodes ahead of a mixed step's chunks
    }
    for kernel, names in expected.items():
        free = {p.name for p in kernel.params if p.do_not_specialize}
        assert free == names, (kernel.fn.__name__, free)
