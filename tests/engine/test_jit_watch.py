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
