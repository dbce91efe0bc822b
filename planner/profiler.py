"""`pdserve profile`: measures one model's step costs on the device at hand, in-process through
the engine (`EngineCore`, the same scheduler and model runner a node runs), and writes a profile
(`planner/profile.py`): prefill step time against new tokens and cached prefix, decode step time
against batch and context, KV transfer time against bytes from this engine's KV pool into another
process's over NIXL (when importable; `kv_probe.py` says what a row measures), and EP dispatch/combine against tokens and ranks (`ep_profile.py`, when several GPUs
exist), and with `--interference` how a prefill and a decode engine on one GPU slow each other
(`interference.py`). Times are medians of repeats after a warm-up; CUDA is synchronised around each step.
Dummy weights: step costs do not depend on the weights' values.
"""
from __future__ import annotations

import datetime
import logging
import os
import statistics
import subprocess
import time

import torch

from engine.config import ModelConfig
from engine.engine_core import EngineCore
from engine.layers.moe import FusedMoE
from engine.engine_args import build_engine_config
from engine.sampling_params import SamplingParams
from planner.kv_probe import measure_kv_transfer
from planner.profile import Profile

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Ids:
    """Fresh random prompts (no accidental prefix-cache hits between measurements)."""

    def __init__(self, vocab: int, seed: int = 0):
        self.gen, self.vocab, self.n = torch.Generator().manual_seed(seed), vocab, 0

    def __call__(self, n: int) -> list[int]:
        return torch.randint(0, self.vocab, (n,), generator=self.gen).tolist()

    def rid(self, tag: str) -> str:
        self.n += 1
        return f"{tag}-{self.n}"


def _run_to_first_token(core: EngineCore, rids: list[str]) -> None:
    reqs = [core.requests[r] for r in rids]
    while any(not r.output_token_ids for r in reqs):
        core.step()


def cached_prefix(core: EngineCore, ids: _Ids, cached: int) -> list[int]:
    """A fresh prompt of `cached` tokens whose pages the engine's prefix cache now holds (one request
    over it and one token more, run to its end)."""
    prefix = ids(cached)
    if cached:
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        core.add_request(ids.rid("warm"), prefix + ids(1), one)
        while core.has_unfinished():
            core.step()
    return prefix


def measure_prefill(core: EngineCore, ids: _Ids, tokens: int, cached: int, repeats: int) -> float:
    """Seconds of the step computing `tokens` new prompt tokens after a cached prefix of `cached`."""
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prefix = cached_prefix(core, ids, cached)
    times = []
    for i in range(repeats + 1):
        rid = ids.rid(f"p{tokens}+{cached}")
        core.add_request(rid, prefix + ids(tokens), one)
        _sync(core.runner.device)
        t0 = time.perf_counter()
        outs, calls = core.step(), 1
        while not (done := [o for o in outs if o.request_id == rid and o.finished]):
            # Overlap scheduling reports a step one call later; a second step of work means chunking.
            if calls > 2 or not core.has_unfinished():
                raise RuntimeError(f"prefill of {tokens} tokens did not finish in one step (raise the chunk budget)")
            outs, calls = core.step(), calls + 1
        _sync(core.runner.device)
        dt = time.perf_counter() - t0
        if done[0].num_cached_tokens != cached:
            raise RuntimeError(f"expected {cached} cached tokens, the engine reused {done[0].num_cached_tokens}")
        if i:  # the first one compiles kernels for the shape
            times.append(dt)
    return statistics.median(times)


def measure_decode(core: EngineCore, ids: _Ids, batch: int, context: int, steps: int) -> float | None:
    """Seconds of one decode step of `batch` sequences around `context` tokens (None: does not fit)."""
    capacity = core.runner.num_pages * core.runner.page_size
    if batch * (context + steps + 8) > capacity or batch > core.config.scheduler.max_num_seqs:
        return None
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    rids = [ids.rid(f"d{batch}x{context}") for _ in range(batch)]
    for rid in rids:
        core.add_request(rid, ids(context), params)
    _run_to_first_token(core, rids)
    for _ in range(3):
        core.step()
    _sync(core.runner.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        core.step()
    _sync(core.runner.device)
    dt = (time.perf_counter() - t0) / steps
    for rid in rids:
        core.abort(rid)
    while core.has_unfinished():
        core.step()
    return dt


def _fill_missing(rows: list[list[float | None]]) -> list[list[float]]:
    """Cells that did not fit the KV pool: the row below scaled like the largest measured batch."""
    for j in range(1, len(rows)):
        for i, v in enumerate(rows[j]):
            if v is None:
                k = max(k for k, x in enumerate(rows[j]) if x is not None)
                rows[j][i] = rows[j - 1][i] * rows[j][k] / rows[j - 1][k]
    return rows


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _model_facts(core: EngineCore, mc: ModelConfig) -> dict:
    model = core.runner.model
    moe = [m for m in model.modules() if isinstance(m, FusedMoE)]
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    return {"num_moe_layers": len(moe), "hidden_size": mc.hf["hidden_size"],
            "top_k": moe[0].top_k if moe else 0, "weight_bytes": nbytes(model.parameters()),
            "expert_weight_bytes": sum(nbytes(m.parameters()) for m in moe),
            "activation_bytes": torch.tensor([], dtype=mc.dtype).element_size()}


def run(model: str, dtype: str = "auto", device: str = "auto", prefill_tokens=(128, 512, 2048, 8192),
        cached=(0, 2048, 8192), decode_batch=(1, 4, 16, 64, 128, 256), decode_context=(128, 1024, 4096),
        decode_steps: int = 16, repeats: int = 3, gpu_memory_utilization: float = 0.9, num_pages: int | None = None,
        kv_pages=(16, 64, 256, 1024), ep_ranks=None, ep_tokens=(16, 128, 1024, 4096),
        serving_prompts=(), quantization: str | None = None, kv_cache_dtype: str = "auto",
        interference: bool = False) -> Profile:
    max_model_len = max(max(cached) + max(prefill_tokens), max(decode_context) + decode_steps + 16) + 16
    chunk = max(max(prefill_tokens), max(decode_batch))
    config = build_engine_config(model, dtype=dtype, device=device, load_format="dummy", max_model_len=max_model_len,
                                 quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                                 enable_prefix_cache=True, max_num_seqs=max(decode_batch),
                                 max_num_batched_tokens=chunk, gpu_memory_utilization=gpu_memory_utilization,
                                 num_pages=num_pages, cuda_graph_max_batch=max(decode_batch))
    core = EngineCore(config)
    mc, dev = core.model_config, core.runner.device
    ids = _Ids(mc.vocab_size)
    log.info("profiling %s (%s) on %s: prefill", model, mc.dtype, dev)
    # One untimed pass over the sizes first: the first table row otherwise runs on a cold GPU (clocks,
    # allocator, per-shape compiles) and its small prompts came out 2x slower than the later rows'.
    for n in prefill_tokens:
        measure_prefill(core, ids, n, 0, 1)
    pre = [[measure_prefill(core, ids, n, c, repeats) for n in prefill_tokens] for c in cached]
    log.info("decode")
    dec = _fill_missing([[measure_decode(core, ids, b, ctx, decode_steps) for b in decode_batch]
                         for ctx in decode_context])
    spec = core.runner.kv_spec
    facts = _model_facts(core, mc)
    gpu_bytes = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else 0
    kv_capacity = core.runner.num_pages * core.runner.page_size
    del core
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    kv = measure_kv_transfer(spec, dev, list(kv_pages), repeats) if kv_pages else None
    ep = None
    if ep_ranks and facts["num_moe_layers"]:
        from planner.ep_profile import measure_all_to_all
        ep = measure_all_to_all(list(ep_ranks), list(ep_tokens), mc, dev.type, repeats)
    shared = None
    if interference:  # after this process's engine is gone: two engines of half the memory share
        from planner.interference import measure as measure_interference
        import importlib.util
        # With NIXL, the engines are a prefill and a decode role and the KV hand-off is timed too.
        shared = measure_interference(model, str(mc.dtype).removeprefix("torch."), str(dev.type),
                                      tokens=sorted({min(256, max(prefill_tokens)), min(2048, max(prefill_tokens))}),
                                      batch=sorted({min(4, max(decode_batch)), min(32, max(decode_batch))}),
                                      context=min(1024, max(decode_context)),
                                      push=importlib.util.find_spec("nixl") is not None)
    offset = 3 + decode_steps // 2  # decode contexts grow while timed: the table holds the mean
    prof = Profile(
        model=model, dtype=str(mc.dtype).removeprefix("torch.") + (f"+{quantization}" if quantization else ""),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        num_gpus=torch.cuda.device_count() if dev.type == "cuda" else 0, commit=_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        prefill={"tokens": list(prefill_tokens), "cached": list(cached), "seconds": pre},
        decode={"batch": list(decode_batch), "context": [c + offset for c in decode_context], "seconds": dec},
        kv_bytes_per_token=spec.bytes_per_token, num_layers=spec.num_layers, kv_capacity_tokens=kv_capacity,
        page_size=spec.page_size, kv_transfer=kv, ep=ep, interference=shared, gpu_memory_bytes=gpu_bytes,
        gpu_memory_utilization=gpu_memory_utilization if dev.type == "cuda" else 0.0,
        notes={"torch": torch.__version__, "attention_backend": config.attention_backend,
               "decode_steps": decode_steps, "repeats": repeats, "statistic": "median",
               "kv_cache_dtype": kv_cache_dtype}, **facts)
    if serving_prompts:
        from planner import serving_probe
        for mode, n in (("disaggregated", 1), ("collocated", 0)):
            prof.serving_overhead[mode], prof.serving_overhead_by_prompt[mode] = serving_probe.measure(
                model, str(mc.dtype).removeprefix("torch."), str(dev.type), list(serving_prompts), prof.prefill_time,
                num_prefill=n, repeats=repeats,
                extra_argv=(["--quantization", quantization] if quantization else []) + ["--kv-cache-dtype",
                                                                                         kv_cache_dtype])
        prof.notes["serving_prompts"] = list(serving_prompts)
    return prof


def main_args(args) -> int:
    ep_ranks = args.ep_ranks
    if ep_ranks is None and torch.cuda.is_available():
        ep_ranks = [r for r in (2, 4, 8) if r <= torch.cuda.device_count()]
    prof = run(args.model, args.dtype, args.device, args.prefill_tokens, args.cached, args.decode_batch,
               args.decode_context, args.decode_steps, args.repeats, args.gpu_memory_utilization, args.num_pages,
               args.kv_pages, ep_ranks, args.ep_tokens, args.serving_prompts, args.quantization,
               args.kv_cache_dtype, args.interference)
    prof.save(args.out)
    print(f"wrote {args.out}: {prof.model} ({prof.dtype}) on {prof.device}, commit {prof.commit}; prefill "
          f"{prof.prefill['tokens'][-1]} tokens {prof.prefill_time(prof.prefill['tokens'][-1]) * 1e3:.1f} ms, decode "
          f"batch {prof.decode['batch'][-1]} "
          f"{prof.decode_time(prof.decode['batch'][-1], prof.decode['context'][0]) * 1e3:.1f} ms"
          f"{', KV transfer measured' if prof.kv_transfer else ''}{', EP measured' if prof.ep else ''}"
          + "".join(f", {k} serving overhead {v * 1e3:.1f} ms" for k, v in prof.serving_overhead.items()))
    return 0
