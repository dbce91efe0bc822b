"""Kernel choices shared by every engine process of a machine (and by later starts): the decode GEMM
tuner (`decode_gemm.choose`) and the decode-MoE tile tuner (`moe_decode.choose_tiles`) time their
candidates on the device, and timing noise can rank two near-equal candidates differently in two
processes. Two processes that round differently can then give different greedy tokens for the same
request (bench/results/2026-12-07_h100_moe_tiles.md: a prefill engine's own decode against the decode
engine's). Here a choice is made once per (device name, torch and Triton versions, shape key) and kept
in a JSON file: the first process to need it times the candidates while holding the file's lock, and
every other process, now or later, reads that choice instead of timing its own. vLLM and SGLang ship
per-device tables of tuned kernel configs for the same reasons; this one fills itself.

The file is `$PDSERVE_KERNEL_TUNING_CACHE`, default `~/.cache/pdserve/kernel_tuning.json`; `off` (or an
empty value) keeps choices per process, as before. A file that cannot be read or written is logged and
left alone: the process then tunes for itself.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
from typing import Callable

log = logging.getLogger(__name__)

ENV = "PDSERVE_KERNEL_TUNING_CACHE"
DEFAULT_PATH = os.path.join("~", ".cache", "pdserve", "kernel_tuning.json")


def cache_path() -> str | None:
    """The shared file, or None when sharing is off."""
    path = os.environ.get(ENV, DEFAULT_PATH)
    if path.strip().lower() in ("", "off", "0", "none"):
        return None
    return os.path.expanduser(path)


def encode(choice) -> dict:
    """A choice as JSON: a string, a dataclass or a NamedTuple of plain fields."""
    if isinstance(choice, str):
        return {"str": choice}
    if dataclasses.is_dataclass(choice):
        return {"type": type(choice).__name__, "fields": dataclasses.asdict(choice)}
    if hasattr(choice, "_asdict"):
        return {"type": type(choice).__name__, "fields": choice._asdict()}
    raise TypeError(f"cannot store a kernel choice of type {type(choice).__name__}")


def decode(entry: dict, types: dict[str, type]):
    """`encode`'s inverse over the choice types a tuner knows (KeyError/TypeError on anything else)."""
    if "str" in entry:
        return entry["str"]
    return types[entry["type"]](**entry["fields"])


def device_key(device, key: tuple) -> str:
    """`key` (a tuner's shape key, without the device index) on this CUDA device's name and software."""
    import torch
    import triton
    return f"{torch.cuda.get_device_name(device)}|torch {torch.__version__}|triton {triton.__version__}|{key!r}"


def shared_choice(namespace: str, key: str, types: dict[str, type], tune: Callable[[], object]):
    """The choice stored for `namespace`/`key`, else `tune()`'s, stored for everyone after. While a
    process tunes it holds the file's lock, so a second process waits for that choice rather than
    timing the same candidates on the same GPU at the same time (each would disturb the other)."""
    path = cache_path()
    if path is None:
        return tune()
    entry_key = f"{namespace}|{key}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        lock = open(path + ".lock", "a")
    except OSError as e:
        log.warning("kernel tuning cache %s unusable (%s); tuning in this process only", path, e)
        return tune()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = _read(path)
        if entry_key in table:
            try:
                return decode(table[entry_key], types)
            except (KeyError, TypeError) as e:  # written by another version: tune again, overwrite
                log.warning("kernel tuning cache entry %s unreadable (%s); tuning again", entry_key, e)
        choice = tune()
        table[entry_key] = encode(choice)  # the table read above: nobody writes while we hold the lock
        _write(path, table)
        return choice


def tuned(store: dict, namespace: str, device, shape: tuple, types: dict[str, type], tune: Callable[[], object],
          default):
    """A tuner's choice for `shape` on the CUDA `device`: this process's (kept in `store` under
    `(device index, *shape)`), else the machine's or `tune()`'s (`shared_choice`); `default` while a CUDA
    graph is being captured (nothing can be timed then, and nothing is remembered)."""
    import torch
    key = (device.index, *shape)
    choice = store.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return default
        choice = store[key] = shared_choice(namespace, device_key(device, shape), types, tune)
    return choice


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            table = json.load(f)
        return table if isinstance(table, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("kernel tuning cache %s unreadable (%s); starting it afresh", path, e)
        return {}


def _write(path: str, table: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # readers never see half a file
    except OSError as e:
        log.warning("kernel tuning cache %s not written (%s)", path, e)
