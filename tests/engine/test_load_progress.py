"""Weight loading shows a tqdm bar of bytes and shards when asked (or on a terminal), and nothing
otherwise; the tensors are the same either way."""
from __future__ import annotations

import pytest

from engine.weight_loader import checkpoint_files, iter_safetensors
from tests.engine.hf_reference import build_hf_checkpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return build_hf_checkpoint("LlamaForCausalLM", tmp_path_factory.mktemp("shards") / "m", shard=True)[1]


def test_progress_bar_counts_bytes_and_shards(sharded, capsys):
    files = checkpoint_files(sharded)
    assert len(files) > 1
    names = [n for n, _ in iter_safetensors(sharded, progress=True)]
    err = capsys.readouterr().err
    assert "loading weights" in err and f"shard {len(files)}/{len(files)}" in err
    assert "100%" in err.split("\r")[-1]  # every byte of every shard counted
    assert names == [n for n, _ in iter_safetensors(sharded, progress=False)]
    assert capsys.readouterr().err == ""


def test_no_bar_when_stderr_is_not_a_terminal(sharded, capsys):
    list(iter_safetensors(sharded))  # progress=None: pytest's captured stderr is no TTY
    assert capsys.readouterr().err == ""
