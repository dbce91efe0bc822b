"""engine/kernels/tuning_cache.py: one kernel choice per (device, shape) for every process of a machine.
Real processes and a real file lock; the tuners' timing is replaced by functions that return a choice
per process (no GPU here), which is what the cache must make agree."""
from __future__ import annotations

import json
import multiprocessing as mp
import time

import pytest

from engine.kernels import tuning_cache
from engine.kernels.fp8_gemm import GemmTiles
from engine.kernels.moe_decode import DecodeMoeTiles
from engine.kernels.skinny_gemm import SkinnyTiles

TYPES = {"GemmTiles": GemmTiles, "SkinnyTiles": SkinnyTiles, "DecodeMoeTiles": DecodeMoeTiles}


def _worker(path: str, name: str, calls: str, out) -> None:
    import os
    os.environ[tuning_cache.ENV] = path

    def tune():
        with open(calls, "a") as f:
            f.write(name + "\n")
        time.sleep(0.5)  # long enough for the other process to arrive meanwhile
        return SkinnyTiles(2 if name == "a" else 8, 1024, 4, 2)
    out.put((name, tuning_cache.shared_choice("decode_gemm", "H100|(1, (4096, 4096))", TYPES, tune)))


def test_two_processes_get_one_choice_and_only_one_of_them_times_it(tmp_path):
    path, calls = str(tmp_path / "cache" / "tuning.json"), str(tmp_path / "calls.txt")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, n, calls, out)) for n in ("a", "b")]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert got["a"] == got["b"]
    assert open(calls).read().count("\n") == 1  # the second process waited and read the first one's
    table = json.load(open(path))
    assert list(table) == ["decode_gemm|H100|(1, (4096, 4096))"]
    assert tuning_cache.decode(table["decode_gemm|H100|(1, (4096, 4096))"], TYPES) == got["a"]


@pytest.mark.parametrize("choice", ["cublas", GemmTiles(16, 64, 4, 4, fuse_quant=False, split_k=4),
                                    SkinnyTiles(4, 512, 4, 3), DecodeMoeTiles(8, 512, 2, 256, 4, 4)])
def test_every_choice_type_survives_the_file(choice):
    assert tuning_cache.decode(json.loads(json.dumps(tuning_cache.encode(choice))), TYPES) == choice


def test_off_tunes_every_time_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV, "off")
    monkeypatch.chdir(tmp_path)
    n = []
    assert tuning_cache.shared_choice("x", "k", TYPES, lambda: n.append(1) or "cublas") == "cublas"
    assert tuning_cache.shared_choice("x", "k", TYPES, lambda: n.append(1) or "cublas") == "cublas"
    assert len(n) == 2 and list(tmp_path.iterdir()) == []


def test_a_corrupt_file_or_an_unknown_entry_is_tuned_again_and_rewritten(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    monkeypatch.setenv(tuning_cache.ENV, str(path))
    path.write_text("{not json")
    assert tuning_cache.shared_choice("x", "k", TYPES, lambda: SkinnyTiles(1, 2048, 4, 1)) == SkinnyTiles(1, 2048, 4, 1)
    assert tuning_cache.decode(json.loads(path.read_text())["x|k"], TYPES) == SkinnyTiles(1, 2048, 4, 1)
    path.write_text(json.dumps({"x|k": {"type": "Gone", "fields": {}}, "x|other": {"str": "cublas"}}))
    assert tuning_cache.shared_choice("x", "k", TYPES, lambda: "cublas") == "cublas"
    assert json.loads(path.read_text()) == {"x|k": {"str": "cublas"}, "x|other": {"str": "cublas"}}
    # and a stored entry is used without tuning
    assert tuning_cache.shared_choice("x", "other", TYPES, lambda: pytest.fail("tuned a stored choice")) == "cublas"


def test_an_unwritable_place_tunes_in_process(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(tuning_cache.ENV, str(blocker / "sub" / "t.json"))  # a directory under a file
    assert tuning_cache.shared_choice("x", "k", TYPES, lambda: "cublas") == "cublas"


def test_tuned_remembers_per_device_and_shape_and_tunes_nothing_under_capture(tmp_path, monkeypatch):
    """`tuned`, the tuners' shared front: one `tune()` per (device, shape) in a process, the store keyed
    (device index, *shape), the machine's entry keyed by the shape alone; `default` while a graph is
    captured, remembered nowhere."""
    import torch
    monkeypatch.setenv(tuning_cache.ENV, str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuning_cache, "device_key", lambda device, shape: f"GPU|{shape!r}")  # no GPU here
    dev, store, calls = torch.device("cuda", 1), {}, []

    def tune():
        calls.append(1)
        return SkinnyTiles(4, 512, 4, 3)
    default = SkinnyTiles(2, 1024, 4, 2)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tuning_cache.tuned(store, "decode_gemm", dev, (1, (8, 8)), TYPES, tune, default) == default
    assert store == {} and calls == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for _ in range(2):
        assert tuning_cache.tuned(store, "decode_gemm", dev, (1, (8, 8)), TYPES, tune, default) == SkinnyTiles(4, 512, 4, 3)
    assert calls == [1] and store == {(1, 1, (8, 8)): SkinnyTiles(4, 512, 4, 3)}
    assert "decode_gemm|GPU|(1, (8, 8))" in json.loads((tmp_path / "tuning.json").read_text())
