"""Where a prefill step's host time goes (issue 16: DeepSeek-V2-Lite's 2k prefill is host-bound, ~43 ms
wall for ~30 ms of GPU work, and the torch profiler's op table does not say which Python does it).

    python -m bench.prefill_host --model deepseek-v2-lite --tokens 2048 --out DIR

For one prefill step of a single prompt, after a warm-up step of the same length:
- wall ms of the step, host ms to enqueue the model forward (no sync inside), GPU ms of the forward
  (CUDA events around it): enqueue ≥ GPU means the host sets the pace;
- host ms per module class, exclusive of child modules (forward pre/post hooks, perf_counter, no
  sync; the hooks' own cost is measured and stated);
- every host-device synchronisation torch reports during the step (`set_sync_debug_mode("warn")`),
  with the source line that caused it;
- host µs per call of single launches (a torch add, the fused RMSNorm, a cuBLAS mm) on tiny tensors,
  where the GPU is faster than the host, so the time per call is the host's.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import sys
import time
import traceback
import warnings

import torch

from bench.record import emit
from engine.engine_args import build_engine_config
from engine.engine_core import EngineCore
from engine.presets import resolve_model
from engine.sampling_params import SamplingParams


def _prompt(core: EngineCore, tokens: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, core.model_config.vocab_size, (tokens,), generator=gen).tolist()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _run_prefill(core: EngineCore, rid: str, tokens: int, seed: int) -> float:
    core.add_request(rid, _prompt(core, tokens, seed), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    _sync()
    t0 = time.perf_counter()
    outs = core.step()
    while not any(o.request_id == rid and o.finished for o in outs):
        outs = core.step()
    _sync()
    return (time.perf_counter() - t0) * 1e3


class ModuleTimer:
    """Exclusive host time per module class over the forwards run while installed."""

    def __init__(self, model: torch.nn.Module):
        self.stack: list[list] = []  # [class name, start, child time]
        self.exclusive: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self.handles = []
        for m in model.modules():
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        self.forward_enqueue_ms: list[float] = []

    def _pre(self, module, args):
        self.stack.append([type(module).__name__, time.perf_counter(), 0.0])

    def _post(self, module, args, out):
        name, t0, child = self.stack.pop()
        dt = time.perf_counter() - t0
        self.exclusive[name] += dt - child
        self.calls[name] += 1
        if self.stack:
            self.stack[-1][2] += dt
        else:
            self.forward_enqueue_ms.append(dt * 1e3)

    def remove(self):
        for h in self.handles:
            h.remove()


def hook_cost_us() -> float:
    """Host µs one pre + post hook pair adds to a module call (an Identity, measured both ways)."""
    m = torch.nn.Identity()
    x = torch.zeros(1)

    def per_call():
        t0 = time.perf_counter()
        for _ in range(2000):
            m(x)
        return (time.perf_counter() - t0) / 2000
    bare = per_call()
    t = ModuleTimer(m)
    hooked = per_call()
    t.remove()
    return (hooked - bare) * 1e6


def launch_costs(device: torch.device) -> dict:
    """Host µs per call of tiny launches (the GPU finishes each before the host issues the next)."""
    from engine.layers import fused_ops
    x = torch.randn(4, 2048, device=device, dtype=torch.bfloat16)
    w = torch.ones(2048, device=device, dtype=torch.bfloat16)
    m = torch.randn(2048, 64, device=device, dtype=torch.bfloat16)
    cases = {"torch add": lambda: x + x, "empty": lambda: torch.empty(4, 2048, device=device),
             "fused rms_norm (Triton)": lambda: fused_ops.rms_norm(x, w, 1e-6), "mm [4,2048]x[2048,64]": lambda: x @ m,
             "silu_and_mul (Triton)": lambda: fused_ops.silu_and_mul(x)}
    out = {}
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            fn()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        out[name] = host / 500 * 1e6
    return out


def run(args) -> dict:
    cuda = torch.cuda.is_available()  # on CPU (rehearsal only) no GPU times, syncs or launch costs
    device = torch.device("cuda" if cuda else "cpu")
    mc = resolve_model(args.model, args.dtype)
    config = build_engine_config(args.model, dtype=args.dtype, device=str(device), load_format="dummy",
                                 quantization=args.quantization, max_model_len=args.tokens + 16,
                                 enable_prefix_cache=False, max_num_seqs=4, max_num_batched_tokens=args.tokens,
                                 gpu_memory_utilization=0.85, cuda_graph_max_batch=4)
    core = EngineCore(config, model_config=mc)
    model = core.runner.model
    warm = [_run_prefill(core, f"warm{i}", args.tokens, seed=i) for i in range(2)]
    plain = [_run_prefill(core, f"plain{i}", args.tokens, seed=10 + i) for i in range(3)]

    # GPU time of the forward alone: events around the model's forward, host enqueue from the hooks
    timer = ModuleTimer(model)
    events: list[tuple] = []
    orig = model.forward

    def timed_forward(*a, **k):
        if not cuda:
            return orig(*a, **k)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = orig(*a, **k)
        e.record()
        events.append((s, e))
        return out
    model.forward = timed_forward
    hooked = [_run_prefill(core, f"hooked{i}", args.tokens, seed=20 + i) for i in range(3)]
    model.forward = orig
    timer.remove()
    _sync()
    gpu_ms = [s.elapsed_time(e) for s, e in events]
    per_step = max(1, len(hooked))
    by_class = sorted(((n, t * 1e3 / per_step, timer.calls[n] / per_step) for n, t in timer.exclusive.items()),
                      key=lambda r: -r[1])

    # host-device syncs during one step
    syncs: collections.Counter = collections.Counter()
    sync_stacks: list[str] = []
    if cuda:
        syncs, sync_stacks = find_syncs(core, args.tokens)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__, "model": args.model, "tokens": args.tokens, "warmup_ms": warm, "step_ms": plain,
            "hooked_step_ms": hooked, "forward_enqueue_ms": timer.forward_enqueue_ms, "forward_gpu_ms": gpu_ms,
            "hook_pair_us": hook_cost_us(), "host_ms_by_module": by_class,
            "syncs": dict(syncs), "sync_stacks": sync_stacks, "launch_us": launch_costs(device) if cuda else {}}


def find_syncs(core: EngineCore, tokens: int) -> tuple[collections.Counter, list[str]]:
    """Host-device syncs torch reports during one prefill step, keyed by the innermost frame of this
    repository that caused each (the engine's deliberate ones, e.g. reading sampled tokens, included)."""
    syncs: collections.Counter = collections.Counter()
    stacks: dict[str, str] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchron" not in str(message).lower():
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/site-packages/" not in f.filename
                  and "/lib/python" not in f.filename]
        key = f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno}" if frames else f"{filename}:{lineno}"
        syncs[key] += 1
        stacks.setdefault(key, "".join(traceback.format_list(frames[-6:])))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _run_prefill(core, "syncs", tokens, seed=30)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return syncs, [f"{k} ({syncs[k]}x)\n{v}" for k, v in stacks.items()]


def markdown(r: dict) -> str:
    lines = [f"# Prefill host time: {r['model']}, {r['tokens']} tokens, {r['device']} ({r['date']})", "",
             f"- step wall ms: {', '.join(f'{x:.1f}' for x in r['step_ms'])} (hooked: "
             f"{', '.join(f'{x:.1f}' for x in r['hooked_step_ms'])})",
             f"- forward: host enqueue ms {', '.join(f'{x:.1f}' for x in r['forward_enqueue_ms'])}; GPU ms "
             f"{', '.join(f'{x:.1f}' for x in r['forward_gpu_ms'])}; hook pair {r['hook_pair_us']:.1f} µs",
             f"- syncs during one step: {r['syncs'] or 'none'}", "", "| module | host ms per step (exclusive) | calls |",
             "|---|---:|---:|"]
    lines += [f"| {n} | {ms:.2f} | {c:.0f} |" for n, ms, c in r["host_ms_by_module"][:25]]
    lines += ["", "| launch | host µs per call |", "|---|---:|"]
    lines += [f"| {n} | {us:.1f} |" for n, us in r["launch_us"].items()]
    if r["sync_stacks"]:
        lines += ["", "Sync sites:", "```", *r["sync_stacks"], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deepseek-v2-lite")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", choices=["fp8"], default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    r = run(args)
    emit(r, markdown(r), args.out, f"prefill_host_{args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
