"""Typed configuration of the engine: one dataclass per component, validated at construction.

The engine settings (`EngineConfig` and its `CacheConfig` / `SchedulerConfig` / `ParallelConfig`)
are declared once, here: each field's `setting(...)` metadata carries its help text, its
command-line flag and its choices, from which engine/engine_args.py derives the CLI flags, the
keyword form (`build_engine_config`) and the argv a launcher forwards; the Ray config and the Helm
chart are checked against them. The settings are frozen: derive a changed copy with
`dataclasses.replace`.

`ModelConfig` is the single source of truth for a model's shape; everything else (KV page
layout, memory budgets, roofline numbers) is derived from it. It wraps the HF `config.json`
dict (kept as `hf` for architecture-specific fields) and normalises the handful of fields every
component needs.
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from engine.rope_config import position_limit

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
)

# torch is imported where a dtype or device is made, not here: the CLI and the router read the
# settings without paying for torch.
_DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A configuration that cannot work; the message says which field and why."""


def setting(default=MISSING, help: str = "", *, flag: str | None = None, choices: tuple | None = None,
            cli: bool = True, node_only: bool = False, cli_default=MISSING, switch=MISSING):
    """An engine setting: a dataclass field with its CLI description. `flag` defaults to
    `--field-name` (a bool defaulting to False is a switch that sets it); `cli=False`: set by code
    (the launcher, the node's role), never a flag; `node_only`: a flag of the node commands only;
    `cli_default`: the flag's default when it differs (None there means "unset: the field's");
    `switch`: the value a bool's flag sets when it is not the negation of the default (a
    `bool | None` whose None means "decide at run time"). A choice of None is the unset flag."""
    meta = {"help": help, "flag": flag, "choices": choices, "cli": cli, "node_only": node_only,
            "cli_default": cli_default, "switch": switch}
    return field(default=default, metadata=meta)


def check_choices(config) -> None:
    """Every setting declared with `choices` holds one of them."""
    for f in fields(config):
        allowed = f.metadata.get("choices")
        if allowed and getattr(config, f.name) not in allowed:
            raise ConfigError(f"{f.name} must be one of {', '.join(map(str, allowed))}, "
                              f"got {getattr(config, f.name)!r}")


_KV_CACHE_DTYPES = ("fp8_e4m3",)  # torch.float8_e4m3fn


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """`--kv-cache-dtype`: auto (the model's dtype) or fp8_e4m3 (values cast with scale 1, saturating
    at +-448, as vLLM does for checkpoints without KV scales)."""
    if name == "auto":
        return model_dtype
    if name not in _KV_CACHE_DTYPES:
        raise ConfigError(f"unknown kv_cache_dtype {name!r}; expected auto or {', '.join(_KV_CACHE_DTYPES)}")
    import torch

    return torch.float8_e4m3fn


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return getattr(torch, name)


@dataclass(frozen=True)
class KVCacheSpec:
    """Layout of one layer's KV pool: `[num_pages, num_components, page_size, num_heads, head_dim]`.

    A page of one layer is one contiguous block of `page_bytes` bytes, so a KV transfer is a
    list of (layer, page) blocks. GQA models store K and V (2 components); MLA models store
    one component: the compressed latent followed by the rope key (`head_dim = kv_lora_rank +
    qk_rope_head_dim`, one head).
    """

    num_layers: int
    page_size: int
    num_components: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    kind: str  # "gqa" or "mla"

    def __post_init__(self):
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size must be a positive power of two, got {self.page_size}")
        if self.kind not in ("gqa", "mla"):
            raise ConfigError(f"unknown KV kind {self.kind!r}")

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        return (self.num_components, self.page_size, self.num_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one layer."""
        c, p, h, d = self.page_shape
        return c * p * h * d * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV one token occupies across all layers."""
        return self.page_bytes * self.num_layers // self.page_size

    def describe(self) -> dict[str, Any]:
        """A plain description both sides of a KV transfer compare at handshake."""
        return {
            "kind": self.kind, "num_layers": self.num_layers, "page_size": self.page_size,
            "num_components": self.num_components, "num_heads": self.num_heads,
            "head_dim": self.head_dim, "dtype": str(self.dtype).removeprefix("torch."),
        }


@dataclass
class ModelConfig:
    """Normalised view of an HF model config; `hf` keeps the raw dict for model-specific fields."""

    hf: dict[str, Any]
    path: str | None = None  # checkpoint directory, or None for a preset
    dtype: torch.dtype | None = None  # None: float32

    architecture: str = field(init=False)
    model_type: str = field(init=False)
    vocab_size: int = field(init=False)
    hidden_size: int = field(init=False)
    num_layers: int = field(init=False)
    num_heads: int = field(init=False)
    num_kv_heads: int = field(init=False)
    head_dim: int = field(init=False)
    max_model_len: int = field(init=False)
    tie_word_embeddings: bool = field(init=False)
    is_mla: bool = field(init=False)
    is_moe: bool = field(init=False)

    def __post_init__(self):
        if self.dtype is None:
            self.dtype = parse_dtype("float32")
        archs = self.hf.get("architectures") or []
        if not archs:
            raise ConfigError("config.json has no 'architectures' entry")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        self.architecture = arch
        self.model_type = self.hf.get("model_type", "")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(self.hf.get(key), int) or self.hf[key] <= 0:
                raise ConfigError(f"config field {key!r} must be a positive integer, got {self.hf.get(key)!r}")
        self.vocab_size = self.hf["vocab_size"]
        self.hidden_size = self.hf["hidden_size"]
        self.num_layers = self.hf["num_hidden_layers"]
        self.num_heads = self.hf["num_attention_heads"]
        self.num_kv_heads = self.hf.get("num_key_value_heads") or self.num_heads
        self.is_mla = arch.startswith("Deepseek")
        self.is_moe = arch in ("Qwen3MoeForCausalLM",) or self.is_mla and bool(self.hf.get("n_routed_experts"))
        if self.is_mla:
            self.head_dim = self.hf["qk_nope_head_dim"] + self.hf["qk_rope_head_dim"]
        else:
            self.head_dim = self.hf.get("head_dim") or self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_kv_heads}")
        self.max_model_len = position_limit(self.hf)[0]  # the default context and the rotary tables' length
        self.tie_word_embeddings = bool(self.hf.get("tie_word_embeddings", False))

    @classmethod
    def from_pretrained(cls, path: str, dtype: str | torch.dtype = "auto") -> "ModelConfig":
        hf = read_config_json(path)
        return cls(hf=hf, path=path, dtype=resolve_dtype(dtype, hf))

    def check_max_model_len(self, requested: int | None, name: str) -> int:
        """The engine's context limit: `requested` (--max-model-len) if the model can position that
        many tokens, else a ConfigError before any weight is loaded; None takes the model's own."""
        if requested is None or requested <= self.max_model_len:
            return requested or self.max_model_len
        limit, source = position_limit(self.hf)
        raise ConfigError(f"--max-model-len {requested} is beyond what model {name!r} can position: "
                          f"{limit} tokens ({source}); lower --max-model-len to at most {limit}")

    @property
    def eos_token_ids(self) -> list[int]:
        return eos_token_ids(self.hf)

    def kv_spec(self, page_size: int, dtype: torch.dtype | None = None) -> KVCacheSpec:
        dtype = dtype or self.dtype
        if self.is_mla:
            dim = self.hf["kv_lora_rank"] + self.hf["qk_rope_head_dim"]
            return KVCacheSpec(self.num_layers, page_size, 1, 1, dim, dtype, "mla")
        return KVCacheSpec(self.num_layers, page_size, 2, self.num_kv_heads, self.head_dim, dtype, "gqa")


def eos_token_ids(hf: dict[str, Any]) -> list[int]:
    """The EOS ids an HF config names (one or a list; none if unset)."""
    eos = hf.get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def read_config_json(path: str) -> dict[str, Any]:
    """A checkpoint directory's config.json as a dict (ConfigError if missing or not JSON)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{path!r} is neither a known preset nor a directory with config.json")
    with open(cfg_path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None


def resolve_dtype(dtype: str | torch.dtype, hf: dict[str, Any]) -> torch.dtype:
    """`auto` means the checkpoint's dtype, but float32 on CPU-only machines is the caller's call."""
    if dtype != "auto":
        return parse_dtype(dtype)
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return parse_dtype(name if name in _DTYPES else "float32")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing. Exactly one of `num_pages` / `memory_fraction` decides the pool size."""

    page_size: int = setting(16, "tokens per KV page")
    num_pages: int | None = setting(None, "KV pool size in pages (default: from memory; on CPU from "
                                          "cpu_kv_bytes)")
    gpu_memory_utilization: float = setting(
        0.90, "fraction of GPU memory this process may use (weights + activations + KV)")
    cpu_kv_bytes: int = setting(1 << 30, "KV budget on CPU when num_pages is not given", cli=False)
    enable_prefix_cache: bool = setting(True, "the radix prefix cache (--no-prefix-cache: off)",
                                        flag="--no-prefix-cache")

    def __post_init__(self):
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size must be a positive power of two, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ConfigError(f"num_pages must be >= 1, got {self.num_pages}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: sequences per step and tokens per step (chunked prefill budget)."""

    max_num_seqs: int = setting(256, "max sequences per step")
    max_num_batched_tokens: int = setting(8192, "token budget per step (chunked prefill)")
    enable_chunked_prefill: bool = setting(True, "split long prompts over steps", cli=False)
    max_waiting: int = setting(4096, "bounded admission queue: beyond this, requests are refused as "
                                     "overloaded", cli=False)

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class ParallelConfig:
    """How a node's ranks split the model: attention data-parallel, MoE expert-parallel.

    With `ep_size` N, the node runs N engine processes (one per GPU, or gloo processes on CPU);
    each schedules its own requests and KV pages and owns (experts + redundant) / N physical
    expert slots. EPLB rebalances every `eplb_interval` steps (0: never) from the load of the
    last `eplb_window` steps.
    """

    ep_size: int = setting(1, "EP ranks of this node: one engine process per GPU (gloo processes on CPU); "
                              "attention is data-parallel over them, MoE experts are split across them")
    ep_rank: int = setting(0, "this engine process's global EP rank (set by whoever starts the ranks)", cli=False)
    tp_size: int = setting(1, "tensor-parallel ranks (not implemented: 1)", cli=False)
    num_redundant_experts: int = setting(0, "extra physical expert slots for EPLB to replicate hot experts into")
    eplb_interval: int = setting(0, "rebalance experts every N engine steps (0: never)")
    eplb_window: int = setting(32, "steps of expert load the rebalancer looks at")
    eplb_min_gain: float = setting(0.05, "move a layer's experts only if its max/mean GPU load drops by this "
                                         "fraction")
    ep_backend: str = setting("auto", "token all-to-all: DeepEP Buffer API (deep_ep or nixl_ep), fixed-capacity "
                                      "torch.distributed (graph-safe), the fixed rows over symmetric memory (symm, "
                                      "CUDA; decode-sized steps, else fixed) or count-based torch.distributed; "
                                      "auto: DeepEP on CUDA when importable, else fixed",
                              choices=("auto", "fixed", "symm", "torch", "deepep"))
    # Fixed-capacity all-to-all: tokens per rank in one dispatch (a step with more, on any rank, is
    # split into dispatches of at most this many; it bounds the dispatch buffers), and the step size
    # (max tokens over the ranks) from which a step runs as two overlapped micro-batches (0: never;
    # off by default: on two NVLinked H200s it made a 4k V2-Lite prefill slower, 166 vs 151 ms,
    # bench/results/2026-11-29_h200x2_ep.md).
    ep_dispatch_capacity: int = setting(8192, "fixed-capacity all-to-all: most tokens per rank in one dispatch "
                                              "(larger steps are split)")
    ep_overlap_min_tokens: int = setting(0, "run MoE steps of at least this many tokens as two overlapped "
                                            "micro-batches (0: never)")
    # Two-batch overlap across whole layers (engine/ep/two_batch.py) and FP8 activations in the
    # fixed-capacity dispatch: both off until a two-GPU run shows them faster (not measured yet).
    ep_two_batch_min_tokens: int = setting(0, "run steps of at least this many tokens (busiest rank) as two "
                                              "micro-batches interleaved across whole layers (0: never)")
    ep_dispatch_fp8: bool = setting(False, "fixed-capacity all-to-all: send activations as FP8 (e4m3, one scale "
                                           "per token and 128 columns) and dequantize on receipt")
    dist_init_method: str | None = setting(None, "torch.distributed rendezvous (set by whoever starts the ranks)",
                                           cli=False)
    # Multi-host EP group: `ep_nnodes` hosts each run ep_size / ep_nnodes ranks; this host's are
    # global ranks [ep_node_rank * local, ...), rendezvousing at `ep_master` (HOST:PORT).
    ep_nnodes: int = setting(1, "hosts one EP group spans (each runs --ep-size / N ranks and serves as its "
                                "own node)")
    ep_node_rank: int = setting(0, "this host's index in its EP group (0 = leader)")
    ep_master: str | None = setting(None, "HOST:PORT where a multi-host EP group's ranks meet (the leader's "
                                          "address)")

    @property
    def ep_local_size(self) -> int:
        return self.ep_size // self.ep_nnodes

    @property
    def ep_rank_offset(self) -> int:
        return self.ep_node_rank * self.ep_local_size

    def __post_init__(self):
        if self.ep_size < 1 or not 0 <= self.ep_rank < self.ep_size:
            raise ConfigError(f"invalid ep_rank {self.ep_rank} for ep_size {self.ep_size}")
        if self.tp_size != 1:
            raise ConfigError("tensor parallelism is not implemented yet (tp_size must be 1)")
        if self.num_redundant_experts < 0 or (self.num_redundant_experts and self.ep_size == 1):
            raise ConfigError(f"num_redundant_experts={self.num_redundant_experts}: redundant experts need "
                              f"ep_size > 1 and must be >= 0")
        if not 0.0 <= self.eplb_min_gain < 1.0:
            raise ConfigError(f"eplb_min_gain must be in [0, 1), got {self.eplb_min_gain}")
        if self.eplb_interval < 0 or self.eplb_window < 1:
            raise ConfigError(f"EPLB interval must be >= 0 and window >= 1 step, got {self.eplb_interval}, "
                              f"{self.eplb_window}")
        if self.eplb_interval and self.ep_size == 1:
            raise ConfigError("EPLB rebalancing needs ep_size > 1")
        if self.ep_nnodes < 1 or self.ep_size % self.ep_nnodes or not 0 <= self.ep_node_rank < self.ep_nnodes:
            raise ConfigError(f"ep_size {self.ep_size} must split evenly over ep_nnodes {self.ep_nnodes} hosts, "
                              f"and ep_node_rank {self.ep_node_rank} must be below it")
        if self.ep_nnodes > 1 and not self.ep_master:
            raise ConfigError("an EP group over several hosts needs ep_master (HOST:PORT of its rendezvous)")
        if self.ep_dispatch_capacity < 1 or self.ep_overlap_min_tokens < 0 or self.ep_two_batch_min_tokens < 0:
            raise ConfigError(f"ep_dispatch_capacity must be >= 1, ep_overlap_min_tokens and ep_two_batch_min_tokens "
                              f">= 0, got {self.ep_dispatch_capacity}, {self.ep_overlap_min_tokens}, "
                              f"{self.ep_two_batch_min_tokens}")
        check_choices(self)


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine process needs, built once from the CLI or the `LLM(...)` call."""

    model: str = setting(help="preset name (see `pdserve presets`) or HF checkpoint directory")
    dtype: str = setting("auto", "auto: the checkpoint's dtype on CUDA, float32 on CPU",
                         choices=("auto", *_DTYPES))
    device: str = setting("auto", "auto | cpu | cuda | cuda:N (auto: cuda if available, else cpu)")
    load_format: str = setting("auto", "auto: the checkpoint's safetensors; dummy: seeded random weights "
                                       "(any preset)", choices=("auto", "dummy"))
    quantization: str | None = setting(None, "fp8: quantize a full-precision checkpoint (or dummy weights) to "
                                             "block-scaled FP8 at load; FP8 checkpoints load as FP8 without it",
                                       choices=(None, "fp8"))
    kv_cache_dtype: str = setting("auto", "auto: the model's dtype; fp8_e4m3 halves KV memory (a P/D pair must "
                                          "agree)", choices=("auto", *_KV_CACHE_DTYPES))
    seed: int = setting(0, "sampling seed (also seeds dummy weights)", cli_default=None)
    max_model_len: int | None = setting(None, "context limit (default: the model's max_position_embeddings)")
    attention_backend: str = setting("auto", "attention kernels", choices=("auto", "torch", "triton"))
    enforce_eager: bool = setting(False, "never capture CUDA graphs")
    overlap_schedule: bool = setting(True, "schedule and launch step N+1 while the device runs step N "
                                           "(--no-overlap-schedule: wait for each step's tokens first)",
                                     flag="--no-overlap-schedule")
    cuda_graph_max_batch: int = setting(256, "largest decode batch captured as a CUDA graph", cli=False)
    decode_graph_short_context: int = setting(0, "also capture decode CUDA graphs whose attention sizes its "
                                                 "split-KV launch for contexts up to N tokens (fewer splits, no "
                                                 "merge kernel), replayed while every sequence fits N (0: off)")
    prefill_graph_max_tokens: int = setting(2048, "largest prefill-only step over fresh prompts (tokens) replayed "
                                                   "as CUDA graphs, one per layer, captured at powers of two from "
                                                   "128 (0: eager prefill)")
    prefill_graph_piecewise: bool = setting(True, "the other steps that fit a prefill graph bucket (chunks over "
                                                  "cached prefixes, decodes beside prefill chunks) replay piecewise "
                                                  "prefill CUDA graphs, the attention eager between them "
                                                  "(--no-prefill-graph-piecewise: such steps run eagerly)",
                                            flag="--no-prefill-graph-piecewise")
    tokenizer: str | None = setting(None, "tokenizer directory (default: the checkpoint's, else DeepSeek's)")
    kv_role: str | None = setting(None, "None (standalone) | prefill | decode: KV transfer over the connector "
                                        "(set by the node's role)", cli=False, choices=(None, "prefill", "decode"))
    kv_transfer_timeout_s: float = setting(30.0, "seconds any KV transfer may take", flag="--kv-transfer-timeout",
                                           node_only=True)
    collocated: bool = setting(False, "a decode node that also runs whole requests (the router's --collocated; "
                                      "`pdserve up --num-prefill 0` sets it): it captures prefill CUDA graphs as a "
                                      "prefill node does", node_only=True)
    kv_connector: str = setting("kvtransfer.nixl_connector:NixlConnector", "KVConnector implementation "
                                "(module:Class)", cli=False)
    load_progress: bool | None = setting(None, "no weight-loading progress bar (it shows only when stderr is a "
                                               "terminal)", flag="--no-progress", switch=False)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        check_choices(self)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA device is available")
        return device

    def resolved_dtype(self, model_hf: dict[str, Any]) -> torch.dtype:
        if self.dtype != "auto":
            return parse_dtype(self.dtype)
        if self.resolved_device().type == "cpu":
            return parse_dtype("float32")
        return resolve_dtype("auto", model_hf)
