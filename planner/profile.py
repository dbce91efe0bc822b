"""A measured performance profile of one model on one kind of GPU, and the step-cost model the
simulator reads from it. The file (JSON) holds the tables `pdserve profile` measured:

* `prefill.seconds[j][i]`: one step computing `tokens[i]` new prompt tokens after `cached[j]`
  tokens already in the KV cache (a cached prefix, or the earlier chunks of a chunked prefill);
* `decode.seconds[j][i]`: one decode step of `batch[i]` sequences at `context[j]` tokens each;
* `kv_transfer` (optional): seconds to push `bytes` of KV (`n` pages of every layer, one NIXL WRITE per
  layer) into another process's KV pool on the profiled device, steady state (`kv_probe.py`; `path` says how);
* `ep` (optional): dispatch / combine seconds of one MoE layer at `tokens` per rank on `ranks` GPUs;
* `interference` (optional): how much a prefill and a decode engine sharing one GPU slow each other;
* `serving_overhead` (optional): the idle serving path's TTFT beyond the prefill step, per mode (and
  `serving_overhead_by_prompt`, per probed prompt size: interpolated log-linearly, held beyond the ends);
* model facts: KV bytes per token, layers, MoE shape, weight bytes, the KV pool of one GPU.

Costs between measured points are interpolated log-log (`interp.py`); prefills shorter than the
first column cost the first column (a step's fixed cost). A step that mixes prefill
chunks and decodes costs the prefill of all its tokens (the decode tokens ride along the same
weight reads), at most the chunks' prefills one after another (the table's rows are single
sequences, whose causal attention grows with the square of their length), plus the decodes'
attention over their context beyond the smallest one measured.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from planner.interp import Table1D, Table2D, held_log_linear

VERSION = 1


class ProfileError(ValueError):
    """A profile file is malformed or misses what the caller needs."""


@dataclass
class Profile:
    model: str
    dtype: str
    device: str
    prefill: dict  # {"tokens": [...], "cached": [...], "seconds": [[...] per cached]}
    decode: dict  # {"batch": [...], "context": [...], "seconds": [[...] per context]}
    kv_bytes_per_token: int
    num_layers: int
    kv_capacity_tokens: int  # KV pool of one engine on one GPU, at the measured memory share
    page_size: int = 16
    num_gpus: int = 1
    commit: str = ""
    date: str = ""
    ep_size: int = 1  # EP size the step tables were measured at
    num_moe_layers: int = 0
    hidden_size: int = 0
    top_k: int = 0
    activation_bytes: int = 2  # bytes of one hidden element sent by a dispatch
    weight_bytes: int = 0
    expert_weight_bytes: int = 0  # routed experts' share of weight_bytes (split over EP ranks)
    gpu_memory_bytes: int = 0  # of one GPU
    gpu_memory_utilization: float = 0.0  # the share kv_capacity_tokens was sized at
    # Idle-cluster TTFT beyond the prefill step (router, RPC hops, reservation), per serving mode.
    serving_overhead: dict = field(default_factory=dict)  # {"disaggregated": s, "collocated": s}
    # The same per probed prompt size, {mode: [[prompt tokens, s], ...]}: a constant missed both ends (V2-Lite's
    # overhead over 2k-token prompts was 6-8 ms where the probe's median over 256 and 2k said 12-19 ms).
    serving_overhead_by_prompt: dict = field(default_factory=dict)
    kv_transfer: dict | None = None  # {"bytes": [...], "seconds": [...], "path": "..."}
    ep: dict | None = None  # {"ranks": [...], "tokens": [...], "dispatch_seconds": [[...]], "combine_seconds": [[...]]}
    # Two engines on one GPU (`interference.py`): {"decode_slowdown": x, "prefill_slowdown": y, ...}, the
    # ratio of a step's time beside the other role's continuous work to its time alone.
    interference: dict | None = None
    notes: dict = field(default_factory=dict)
    version: int = VERSION

    def __post_init__(self):
        try:
            self._prefill = Table2D(self.prefill["tokens"], self.prefill["cached"], self.prefill["seconds"])
            self._decode = Table2D(self.decode["batch"], self.decode["context"], self.decode["seconds"])
            self._kv = (Table1D(self.kv_transfer["bytes"], self.kv_transfer["seconds"])
                        if self.kv_transfer else None)
            self._ep = None
            if self.ep:
                self._ep = (Table2D(self.ep["tokens"], self.ep["ranks"], self.ep["dispatch_seconds"]),
                            Table2D(self.ep["tokens"], self.ep["ranks"], self.ep["combine_seconds"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"profile of {self.model!r}: bad table ({e})") from None
        if self.kv_bytes_per_token <= 0 or self.num_layers <= 0 or self.kv_capacity_tokens <= 0:
            raise ProfileError(f"profile of {self.model!r}: kv_bytes_per_token, num_layers and "
                               f"kv_capacity_tokens must be positive")
        self._ctx0 = self.decode["context"][0]

    # ------------------------------------------------------------- files
    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "Profile":
        with open(path) as f:
            d = json.load(f)
        if d.get("version") != VERSION:
            raise ProfileError(f"{path}: profile version {d.get('version')!r}, expected {VERSION}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    # ------------------------------------------------------------- costs (seconds)
    def prefill_time(self, tokens: int, cached: int = 0) -> float:
        """A step computing fewer tokens than the smallest measured costs as much as that one: a
        step's fixed cost (every weight read, every kernel launch) does not shrink with the prompt,
        so the table is not extrapolated below its first column."""
        return self._prefill(max(tokens, self.prefill["tokens"][0], 1), cached)

    def decode_time(self, batch: int, context: float) -> float:
        return self._decode(max(batch, 1), context)

    def step_time(self, prefill_chunks: list[tuple[int, int]], num_decodes: int, decode_context_sum: int,
                  ep_size: int = 1) -> float:
        """One engine step of `prefill_chunks` ((new tokens, start), ...) and `num_decodes`
        sequences whose contexts sum to `decode_context_sum`, on one rank of an EP group of `ep_size`."""
        dec = 0.0
        ctx = decode_context_sum / num_decodes if num_decodes else 0.0
        if num_decodes:
            dec = self.decode_time(num_decodes, ctx) * self.expert_read_scale(ep_size)
        if not prefill_chunks:
            return dec
        total = sum(n for n, _ in prefill_chunks)
        # Attention of each chunk over its earlier tokens, beyond a chunk of the same size at the start.
        extra = sum(self.prefill_time(n, s) - self.prefill_time(n, 0) for n, s in prefill_chunks if s > 0)
        # Several prompts in one step share the weight reads but not their causal attention: the
        # table's row for `total` tokens is one sequence of that length (attention over all of it),
        # so a step never costs more than running its chunks one after another.
        base = self.prefill_time(total + num_decodes, 0)
        if len(prefill_chunks) > 1:
            base = min(base, sum(self.prefill_time(n, 0) for n, _ in prefill_chunks))
        t = base + max(extra, 0.0)
        if num_decodes:
            t += max(0.0, self.decode_time(num_decodes, ctx) - self.decode_time(num_decodes, self._ctx0))
        return t

    def request_overhead(self, mode: str, prompt_tokens: int | None = None) -> float:
        """The idle serving path's TTFT beyond the prefill step for a prompt of `prompt_tokens` in `mode`
        (disaggregated or collocated): per probed size where the profile has them, else the mode's one figure."""
        points = self.serving_overhead_by_prompt.get(mode)
        if points:
            return max(0.0, float(held_log_linear(sorted((float(n), float(v)) for n, v in points), prompt_tokens)))
        return float(self.serving_overhead.get(mode, 0.0))

    def slowdown(self, role: str, prefill_tokens: int | None = None, decode_batch: int | None = None) -> float:
        """A `role` step's stretch while the other role's engine works on the same GPU (1 if unmeasured).
        Where the profile measured several prompt sizes (`by_prefill_tokens`), the stretch follows the
        size of the prefill step involved (this one, or the partner's beside a decode step): linear in
        log tokens between the measured sizes, held at the end values beyond them. Where it measured
        several decode batches too (rows with `decode_batch`), it follows the decode engine's running
        batch the same way: an MoE decode step at batch 1 reads a few experts, at 32 most of them, and
        presses on the prefill beside it accordingly."""
        if not self.interference:
            return 1.0
        key = f"{'prefill' if role == 'prefill' else 'decode'}_slowdown"
        return self._interference_value(key, prefill_tokens, decode_batch, 1.0)

    def shared_push_exposed(self, prompt_tokens: int, decode_batch: int | None = None) -> float:
        """Seconds a prompt's KV hand-off runs on after its prefill while a decode engine works on the
        same GPU (`planner/interference.py --push`), by prompt size and decode batch as `slowdown`
        interpolates; 0 if unmeasured."""
        if not self.interference:
            return 0.0
        return self._interference_value("push_exposed_shared_s", prompt_tokens, decode_batch, 0.0)

    def _interference_value(self, key: str, prefill_tokens: int | None, decode_batch: int | None,
                            default: float) -> float:
        """The interference table's `key` at a prefill size and decode batch: linear in log tokens between
        the measured prompt sizes of each measured decode batch, then linear in log batch between those,
        held at the end values beyond either; a table of one size and batch gives its one figure."""
        table = self.interference
        rows = [r for r in table.get("by_prefill_tokens") or [] if key in r]
        if not rows:
            return float(table.get(key, default))
        by_batch: dict[int, list[tuple[float, float]]] = {}
        # rows of tables measured at one decode batch carry it only at the top level
        for r in sorted(rows, key=lambda r: r["prefill_tokens"]):
            by_batch.setdefault(int(r.get("decode_batch", table.get("decode_batch", 0))), []).append(
                (r["prefill_tokens"], r[key]))
        at_size = [(b, held_log_linear(points, prefill_tokens)) for b, points in sorted(by_batch.items())]
        if len(at_size) == 1:
            return float(at_size[0][1])
        return float(held_log_linear(at_size, decode_batch))  # the largest batch's without one

    def expert_read_scale(self, ep_size: int) -> float:
        """Decode is bound by weight reads; with EP each GPU reads only its share of the experts."""
        if ep_size <= self.ep_size or not self.weight_bytes:
            return 1.0
        f = self.expert_weight_bytes / self.weight_bytes
        return 1.0 - f + f * self.ep_size / ep_size

    def kv_capacity(self, ep_size: int = 1) -> int:
        """KV tokens one GPU holds in an EP group of `ep_size`: expert weights split over the group
        leave room for more KV."""
        freed = self.expert_weight_bytes * max(0.0, 1 / self.ep_size - 1 / max(ep_size, 1))
        return int(self.kv_capacity_tokens + freed / self.kv_bytes_per_token)

    def kv_capacity_at(self, gpu_memory_utilization: float, ep_size: int = 1) -> int:
        """KV tokens of one GPU when the engine may use another share of its memory."""
        extra = (gpu_memory_utilization - self.gpu_memory_utilization) * self.gpu_memory_bytes
        if not self.gpu_memory_bytes:
            extra = 0.0
        return max(self.page_size, int(self.kv_capacity(ep_size) + extra / self.kv_bytes_per_token))

    def kv_transfer_time(self, nbytes: int) -> float | None:
        """Measured KV transfer time for `nbytes` on the profiled path, or None if not measured."""
        return self._kv(max(nbytes, 1)) if self._kv else None

    def all_to_all_time(self, tokens_per_rank: int, ep_size: int, link=None) -> float:
        """Dispatch + combine of every MoE layer in one step, at `tokens_per_rank` on `ep_size` GPUs:
        the measured table when it covers `ep_size`, else `link` (a `link.Link`) carrying each
        token's hidden state to its top-k experts' ranks and back."""
        if ep_size <= 1 or not self.num_moe_layers or tokens_per_rank <= 0:
            return 0.0
        if self._ep and min(self.ep["ranks"]) <= ep_size <= max(self.ep["ranks"]):
            d, c = self._ep
            per_layer = d(tokens_per_rank, ep_size) + c(tokens_per_rank, ep_size)
        else:
            if link is None:
                raise ProfileError(f"profile of {self.model!r} has no EP table for {ep_size} ranks; give a link")
            remote = tokens_per_rank * min(self.top_k, ep_size) * (ep_size - 1) / ep_size
            nbytes = remote * self.hidden_size * self.activation_bytes
            per_layer = 2 * link.time(nbytes)
        return self.num_moe_layers * per_layer


def synthetic(prefill_s_per_token: float = 1e-4, prefill_fixed_s: float = 0.005, decode_fixed_s: float = 0.01,
              decode_s_per_seq: float = 1e-4, decode_s_per_token_ctx: float = 1e-8, kv_capacity_tokens: int = 200_000,
              kv_bytes_per_token: int = 50_000, num_layers: int = 24, **kw) -> Profile:
    """A profile from a linear cost model (for tests and what-if runs): prefill = fixed + per-token,
    decode = fixed + per-sequence + per-token of context."""
    tokens = [1, 16, 128, 1024, 8192, 65536]
    cached = [0, 4096, 32768]
    batch = [1, 8, 64, 512]
    context = [16, 1024, 8192, 65536]
    pre = [[prefill_fixed_s + prefill_s_per_token * n * (1 + c / 65536) for n in tokens] for c in cached]
    dec = [[decode_fixed_s + decode_s_per_seq * b + decode_s_per_token_ctx * b * ctx for b in batch] for ctx in context]
    return Profile(model=kw.pop("model", "synthetic"), dtype="bfloat16", device="synthetic",
                   prefill={"tokens": tokens, "cached": cached, "seconds": pre},
                   decode={"batch": batch, "context": context, "seconds": dec},
                   kv_bytes_per_token=kv_bytes_per_token, num_layers=num_layers,
                   kv_capacity_tokens=kv_capacity_tokens, **kw)


def constant(prefill_s: float, decode_s: float, **kw) -> Profile:
    """Every prefill step takes `prefill_s`, every decode step `decode_s` (queueing tests)."""
    p = synthetic(**kw)
    p.prefill["seconds"] = [[prefill_s] * len(p.prefill["tokens"]) for _ in p.prefill["cached"]]
    p.decode["seconds"] = [[decode_s] * len(p.decode["batch"]) for _ in p.decode["context"]]
    return Profile(**p.to_dict())

