"""How much a prefill engine and a decode engine slow each other down when they share one GPU (the
one-GPU `pdserve up`: two engine processes, whose kernels the GPU interleaves by time slices).
Two processes like the product's each build an engine at half the memory share; the parent times
a decode step (batch B, context C) and a prefill step (T new tokens) once alone and once while the
other process keeps stepping without pause. The ratios go into the profile (`interference`); the
simulator stretches a step that overlaps the other role's work on its GPU by them.

With `push` (`--push`), the two engines are a prefill-role and a decode-role engine joined by NIXL, as
in the one-GPU `pdserve up`, and each prompt size also gets the KV hand-off's exposed time: prompts
prefilled and pushed layer by layer into pages the decode engine reserved, once with the decode engine
idle and once while it keeps decoding its batch (`push_exposed_alone_s`, `push_exposed_shared_s`: the
median time from the end of the prefill compute to the push's end, what the hand-off adds to TTFT). The
simulator adds the shared figure to a prompt's KV landing when its prefill and a decode step share a GPU.

`python -m planner.interference --profile P.json --model qwen3-8b --device cuda` measures and
writes the table into the profile file.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time


def _engine(model: str, dtype: str, device: str, mem: float, max_len: int, max_seqs: int, chunk: int,
            kv_role: str | None = None):
    from engine.engine_args import build_engine_config
    from engine.engine_core import EngineCore
    config = build_engine_config(model, dtype=dtype, device=device, load_format="dummy", max_model_len=max_len,
                                 enable_prefix_cache=False, max_num_seqs=max_seqs, max_num_batched_tokens=chunk,
                                 gpu_memory_utilization=mem, cuda_graph_max_batch=max_seqs, kv_role=kv_role)
    core = EngineCore(config)
    if kv_role is not None:  # as the engine process does for a node (engine/engine_process.py)
        from engine.engine_process import _connector_class
        core.attach_connector(_connector_class(config.kv_connector).for_engine(core))
    return core


def _sync(core) -> None:
    import torch
    if core.runner.device.type == "cuda":
        torch.cuda.synchronize(core.runner.device)


class _Prefill:
    """One prefill of `tokens` fresh tokens per unit (max_tokens 1)."""

    def __init__(self, core, tokens: int):
        import torch
        self.core, self.tokens, self.n = core, tokens, 0  # `tokens` may change between commands ("size")
        self.gen = torch.Generator().manual_seed(1)

    def ready(self, n: int) -> None:
        pass

    def prompt(self) -> list[int]:
        import torch
        return torch.randint(0, self.core.model_config.vocab_size, (self.tokens,), generator=self.gen).tolist()

    def unit(self) -> None:
        from engine.sampling_params import SamplingParams
        self.n += 1
        self.core.add_request(f"p{self.n}", self.prompt(), SamplingParams(temperature=0, max_tokens=1,
                                                                           ignore_eos=True))
        while self.core.has_unfinished():
            self.core.step()

    def push(self, rid: str, ids: list[int], dest: dict) -> dict:
        """Prefill `ids` and push its KV to `dest` (pages the decode engine reserved): the push's stats."""
        from engine.sampling_params import SamplingParams
        self.core.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), kv_dest=dest)
        stats = None
        while self.core.has_unfinished() or self.core.has_kv_in_flight():
            for out in self.core.step():
                if out.finished:
                    if out.error:
                        raise RuntimeError(f"KV hand-off of {rid} failed: {out.error}")
                    stats = out.kv_transfer or stats
        if stats is None:
            raise RuntimeError(f"KV hand-off of {rid} reported no transfer")
        return stats


class _Decode:
    """Decode steps of `batch` sequences around `context` tokens (refilled when they finish)."""

    def __init__(self, core, batch: int, context: int, horizon: int):
        self.core, self.batch, self.context, self.horizon, self.n = core, batch, context, horizon, 0
        self.left = 0

    def _end_batch(self) -> None:
        """Abort the batch's own requests and drain (reservations, "x…", end when their KV lands)."""
        for r in list(self.core.requests):
            if r.startswith("d"):
                self.core.abort(r)
        while self.core.has_unfinished():
            self.core.step()

    def _refill(self) -> None:
        from engine.sampling_params import SamplingParams
        self._end_batch()
        params = SamplingParams(temperature=0, max_tokens=self.horizon, ignore_eos=True)
        ids = []
        for _ in range(self.batch):
            self.n += 1
            ids.append(f"d{self.n}")
            self.core.add_request(ids[-1], [(self.n * 7 + i) % 1000 + 1 for i in range(self.context)], params)
        # Prefill (batch × context tokens: several chunks at a large batch), then warm decode steps, so a timed
        # unit is a decode step of the whole batch (six steps were too few at batch 32 × 1k: 2026-12-07j
        # timed prefill chunks as "decode alone", 48 ms against 13)
        for _ in range(10_000):
            self.core.step()
            if all(len(self.core.requests[r].output_token_ids) >= 3 for r in ids):
                break
        else:
            raise RuntimeError(f"the decode batch of {self.batch} did not reach its decode steps")
        self.left = self.horizon - max(len(self.core.requests[r].output_token_ids) for r in ids) - 2

    def ready(self, n: int) -> None:
        """Refill now if fewer than `n` steps are left, so no refill (a prefill) lands in timed work."""
        if self.left < n:
            self._refill()

    def unit(self) -> None:
        if self.left <= 0:
            self._refill()
        self.core.step()
        self.left -= 1

    def pause(self) -> None:
        """End the batch (the next unit refills it)."""
        self._end_batch()
        self.left = 0

    def reserve(self, rid: str, ids: list[int]) -> dict:
        """Pages for a prompt another engine prefills (max_tokens 1: it ends when its KV lands)."""
        from engine.sampling_params import SamplingParams
        return self.core.add_remote_request(rid, ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))

    def settle(self) -> None:
        """Step until every reservation's KV has landed (and its request ended)."""
        while any(r.startswith("x") for r in self.core.requests) or self.core.has_kv_in_flight():
            self.core.step()


def _worker(role: str, cfg: dict, cmds, results) -> None:
    """Runs in its own process: builds the engine, then obeys ("time", n) → median seconds of n units,
    ("loop", None) → units until the parent sets `stop` (the shared event in cfg), ("size", t) → the
    prefill worker's prompts are now t tokens, ("batch", b) → the decode worker runs b sequences from
    its next refill, ("quit", None). With cfg["push"]: ("prompt", None) → a
    prompt of the prefill worker's size; ("push", (rid, ids, dest)) → the prefill worker prefills it into
    the decode engine's pages (its push stats); ("reserve", (rid, ids)) → the decode worker's destination
    for it (answered between its steps while it loops); ("serve", None) → the decode worker, its batch
    ended, serves reservations and their landing KV until `stop`; ("settle", None) → the decode worker
    steps until the reservations' KV has landed."""
    try:
        kv_role = role if cfg.get("push") else None
        core = _engine(cfg["model"], cfg["dtype"], cfg["device"], cfg["mem"], cfg["max_len"], cfg["batch"],
                       max(max(cfg["tokens"]), cfg["batch"]), kv_role)
        work = (_Prefill(core, cfg["tokens"][0]) if role == "prefill"
                else _Decode(core, cfg["batch"], cfg["context"], cfg["horizon"]))
        for t in cfg["tokens"] if role == "prefill" else [None]:  # compile / capture before anything is timed
            if t is not None:
                work.tokens = t
            for _ in range(2):
                work.unit()
        _sync(core)
        results.put((role, "ready", None))
        while True:
            cmd, n = cmds.get()
            if cmd == "quit":
                return
            if cmd == "size":
                work.tokens = n
                continue
            if cmd == "batch":  # the decode worker's batch from its next refill on
                work.batch, work.left = n, 0
                continue
            if cmd == "push":
                rid, ids, dest = n
                t0 = time.perf_counter()
                stats = work.push(rid, ids, dest)
                results.put((role, "pushed", dict(stats, wall_s=time.perf_counter() - t0)))
                continue
            if cmd == "prompt":
                results.put((role, "prompt", work.prompt()))
                continue
            if cmd == "reserve":
                results.put((role, "dest", work.reserve(*n)))
                continue
            if cmd == "settle":
                work.settle()
                results.put((role, "settled", None))
                continue
            if cmd == "serve":  # decode worker without its batch: reservations and their landing KV only
                work.pause()
                results.put((role, "looping", None))
                while not cfg["stop"].is_set():
                    _serve_reservations(work, cmds, results)
                    if core.has_unfinished() or core.has_kv_in_flight():
                        core.step()
                    else:
                        time.sleep(0.0005)
                results.put((role, "stopped", None))
                continue
            work.ready(n if cmd == "time" else cfg["horizon"] // 2)
            if cmd == "time":
                times = []
                for _ in range(n):
                    _sync(core)
                    t0 = time.perf_counter()
                    work.unit()
                    _sync(core)
                    times.append(time.perf_counter() - t0)
                results.put((role, "time", statistics.median(times)))
            elif cmd == "loop":
                results.put((role, "looping", None))
                while not cfg["stop"].is_set():
                    work.unit()
                    if cfg.get("push") and role == "decode":
                        _serve_reservations(work, cmds, results)
                _sync(core)
                results.put((role, "stopped", None))
    except Exception as e:  # noqa: BLE001 - the parent reports it
        results.put((role, "error", f"{type(e).__name__}: {e}"))


def _serve_reservations(work, cmds, results) -> None:
    """Between a looping decode worker's steps: reserve pages for any prompts the parent announced."""
    import queue
    while True:
        try:
            cmd, n = cmds.get_nowait()
        except queue.Empty:
            return
        if cmd != "reserve":
            raise RuntimeError(f"decode worker: {cmd!r} while looping")
        results.put(("decode", "dest", work.reserve(*n)))


def _expect(results, role: str, what: str, timeout: float):
    r, kind, val = results.get(timeout=timeout)
    if kind == "error":
        raise RuntimeError(f"interference {r} process failed: {val}")
    if (r, kind) != (role, what):
        raise RuntimeError(f"interference: expected {role} {what}, got {r} {kind}")
    return val


def measure(model: str, dtype: str = "bfloat16", device: str = "cuda", tokens: int | list[int] = 2048,
            batch: int | list[int] = 32, context: int = 1024, mem: float = 0.4, decode_units: int = 40,
            prefill_units: int = 5, timeout: float = 300.0, push: bool = False) -> dict:
    """Decode step and prefill step seconds, alone and beside the other role's continuous work. With
    several prefill sizes or decode batches (one pair of engine processes for all), the top-level figures
    are the largest size's at the largest batch and `by_prefill_tokens` lists every (batch, size) row: a
    short prompt's prefill is host-bound and fares differently on a time-sliced GPU than a long,
    GPU-bound one, and an MoE decode step at a small batch reads a fraction of the experts it reads at a
    large one."""
    sizes = sorted(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
    batches = sorted(batch) if isinstance(batch, (list, tuple)) else [batch]
    batch = batches[-1]  # the engines are sized for the largest
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    cfg = dict(model=model, dtype=dtype, device=device, mem=mem, tokens=sizes, batch=batch, context=context,
               horizon=8 * decode_units + 64, max_len=max(sizes[-1] + 8, context + 8 * decode_units + 80),
               stop=stop, push=push)
    results = ctx.Queue()
    cmds = {r: ctx.Queue() for r in ("prefill", "decode")}
    procs = {r: ctx.Process(target=_worker, args=(r, cfg, cmds[r], results), daemon=True) for r in cmds}
    for p in procs.values():
        p.start()
    try:
        ready = set()
        while len(ready) < 2:
            r, kind, val = results.get(timeout=timeout)
            if kind == "error":
                raise RuntimeError(f"interference {r} process failed: {val}")
            ready.add(r)

        def timed(role: str, n: int) -> float:
            cmds[role].put(("time", n))
            return _expect(results, role, "time", timeout)

        def beside(busy: str, role: str, n: int) -> float:
            stop.clear()
            cmds[busy].put(("loop", None))
            _expect(results, busy, "looping", timeout)
            time.sleep(0.2)
            t = timed(role, n)
            stop.set()
            _expect(results, busy, "stopped", timeout)
            return t

        def hand_off(rid: str) -> dict:
            """One prompt prefilled and pushed into pages the decode worker reserved (between its steps
            if it is looping)."""
            cmds["prefill"].put(("prompt", None))
            ids = _expect(results, "prefill", "prompt", timeout)
            cmds["decode"].put(("reserve", (rid, ids)))
            dest = _expect(results, "decode", "dest", timeout)
            cmds["prefill"].put(("push", (rid, ids, dest)))
            return _expect(results, "prefill", "pushed", timeout)

        def pushes(tag: str, shared: bool) -> list[dict]:
            """The decode worker decodes its batch (shared) or only serves the hand-offs (alone) meanwhile."""
            stop.clear()
            cmds["decode"].put(("loop" if shared else "serve", None))
            _expect(results, "decode", "looping", timeout)
            if shared:
                time.sleep(0.2)
            out = [hand_off(f"x{tag}-{'s' if shared else 'a'}{i}") for i in range(prefill_units)]
            stop.set()
            _expect(results, "decode", "stopped", timeout)
            cmds["decode"].put(("settle", None))
            _expect(results, "decode", "settled", timeout)
            return out

        rows = []
        for b in batches:
            cmds["decode"].put(("batch", b))
            decode_alone = timed("decode", decode_units)
            for t in sizes:
                cmds["prefill"].put(("size", t))
                row = {"prefill_tokens": t, "decode_batch": b, "decode_alone_s": decode_alone,
                       "prefill_alone_s": timed("prefill", prefill_units),
                       "decode_shared_s": beside("prefill", "decode", decode_units),
                       "prefill_shared_s": beside("decode", "prefill", prefill_units)}
                row.update(decode_slowdown=row["decode_shared_s"] / row["decode_alone_s"],
                           prefill_slowdown=row["prefill_shared_s"] / row["prefill_alone_s"])
                if push:
                    for shared, name in ((False, "alone"), (True, "shared")):
                        stats = pushes(f"{b}-{t}", shared)
                        row[f"push_exposed_{name}_s"] = statistics.median(x["exposed_seconds"] for x in stats)
                        row[f"push_wall_{name}_s"] = statistics.median(x["wall_s"] for x in stats)
                        row[f"push_destination_wait_{name}_s"] = statistics.median(
                            x.get("destination_wait_seconds", 0.0) for x in stats)
                rows.append(row)
        for r in cmds:
            cmds[r].put(("quit", None))
    finally:
        for p in procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    out = dict(rows[-1])
    out.update(decode_batch=batch, decode_context=context, memory_share=mem)
    if len(rows) > 1:
        out["by_prefill_tokens"] = rows
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True, help="profile JSON to add the `interference` table to")
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prefill-tokens", type=lambda v: [int(x) for x in v.split(",")], default=[2048],
                    help="prompt sizes of the prefill engine, comma-separated (e.g. 256,2048)")
    ap.add_argument("--decode-batch", type=lambda v: [int(x) for x in v.split(",")], default=[32],
                    help="decode batches beside the prefills, comma-separated (e.g. 4,32: an MoE model's "
                         "interference grows with the experts a decode step reads)")
    ap.add_argument("--decode-context", type=int, default=1024)
    ap.add_argument("--memory-share", type=float, default=0.4, help="gpu_memory_utilization of each engine")
    ap.add_argument("--decode-steps", type=int, default=40)
    ap.add_argument("--prefills", type=int, default=5)
    ap.add_argument("--push", action="store_true",
                    help="prefill and decode roles joined by NIXL: also time the KV hand-off alone and beside decode")
    args = ap.parse_args(argv)
    table = measure(args.model, args.dtype, args.device, args.prefill_tokens, args.decode_batch, args.decode_context,
                    args.memory_share, args.decode_steps, args.prefills, push=args.push)
    with open(args.profile) as f:
        d = json.load(f)
    d["interference"] = table
    with open(args.profile, "w") as f:
        json.dump(d, f, indent=1)
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
