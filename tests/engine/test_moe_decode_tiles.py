"""The decode-MoE tile tuner (engine/kernels/moe_decode.py): every tiling it may pick against the
torch references (interpreter on CPU, native on GPU), and its search over timings (a fake timer here:
no GPU times anything on CPU)."""
from __future__ import annotations

import pytest
import torch

from engine.kernels import moe_decode
from engine.kernels.moe_decode import DOWN_CANDIDATES, UP_CANDIDATES, DecodeMoeTiles, default_tiles, search
from tests.engine.kernel_checks import check_passes_on_cpu, check_passes_on_gpu


def test_every_candidate_tiling_matches_the_references_under_the_interpreter():
    check_passes_on_cpu("check_moe_decode_tiles", "small", max(len(UP_CANDIDATES[False]), len(DOWN_CANDIDATES[False]))
                        + max(len(UP_CANDIDATES[True]), len(DOWN_CANDIDATES[True])))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_every_candidate_and_the_tuned_choice_match_the_references_at_deepseek_v2_lite_sizes_on_gpu():
    check_passes_on_gpu("check_moe_decode_tiles", "v2lite")


@pytest.mark.parametrize("fp8", [False, True])
def test_search_takes_the_fastest_up_tiles_then_the_fastest_down_tiles_with_them(fp8):
    ups, downs = UP_CANDIDATES[fp8], DOWN_CANDIDATES[fp8]
    default = default_tiles(fp8, on_cpu=False)
    fast_up, fast_down = ups[-1], downs[-2]
    calls = []

    def measure(t: DecodeMoeTiles) -> float:
        calls.append(t)
        up, down = (t.up_n, t.up_k, t.up_warps), (t.down_n, t.down_k, t.down_warps)
        return 10.0 - 5.0 * (up == fast_up) - 2.0 * (down == fast_down)
    got = search(measure, fp8, default)
    assert got == moe_decode._tiles_of(fast_up, fast_down)
    # Stage one holds the default down tiles; stage two holds the chosen up tiles; nothing timed twice.
    assert [(c.down_n, c.down_k, c.down_warps) for c in calls[:len(ups)]] == [downs[0]] * len(ups)
    assert all((c.up_n, c.up_k, c.up_warps) == fast_up for c in calls[len(ups):])
    # (fastest up, first down) was timed in stage one already
    assert len(calls) == len(set(calls)) == len(ups) + len(downs) - 1


def test_search_keeps_the_default_when_every_candidate_fails_and_skips_failed_ones():
    default = default_tiles(False, on_cpu=False)
    assert search(lambda t: float("inf"), False, default) == default
    bad_up = UP_CANDIDATES[False][0]
    got = search(lambda t: float("inf") if (t.up_n, t.up_k, t.up_warps) == bad_up else 1.0 + t.down_n, False, default)
    assert (got.up_n, got.up_k, got.up_warps) != bad_up
    assert got.down_n == min(d[0] for d in DOWN_CANDIDATES[False])


def test_off_the_gpu_the_default_tiles_are_used_and_nothing_is_timed(monkeypatch):
    monkeypatch.setattr(moe_decode, "graph_time_ms", lambda *a, **k: pytest.fail("timed on CPU"))
    monkeypatch.setattr(moe_decode, "_chosen", {})
    x = torch.randn(2, 16)
    w13, w2 = torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    got = moe_decode.choose_tiles(x, (w13, None, w2, None), ids, None, None, None, False)
    assert got == default_tiles(False, on_cpu=True)
    assert moe_decode._chosen == {}  # nothing cached: a GPU in the same process still tunes
