"""The typed config of a Ray deployment, read from YAML (`pdserve ray up CONFIG`).

Owns parsing and validation only: every field is checked when the config is built, and an error
names the field (`decode.ep_size: ...`). The engine settings are not restated here: `engine_args`
is checked with the nodes' own flags (derived from engine/config.py) and `load_format` against its
declared choices. It starts nothing and imports no Ray. See deploy/ray/example.yaml (CPU) and
deploy/ray/gpu-example.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from deploy.node_args import node_parser
from engine.engine_args import settings
from router.registry import POLICIES

# Flags the config's own fields own; in engine_args they would contradict them.
OWNED_FLAGS = ("--model", "--load-format", "--host", "--port", "--metrics-port", "--ep-size", "--redis-url",
               "--node-name", "--advertise-host", "--slo")


class ConfigError(ValueError):
    pass


def _int(where: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum else f">= {minimum}"
        raise ConfigError(f"{where}: must be an integer {bound}, got {value!r}")
    return value


def _number(where: str, value, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"{where}: must be a number >= {minimum}, got {value!r}")
    return float(value)


def _text(where: str, value, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class RouterSpec:
    grpc_port: int = 50051
    http_port: int = 8000
    policy: str = "least_load"
    slo: str | None = None  # e.g. "ttft:1000 tpot:50" (milliseconds), passed to `pdserve router --slo`
    cpus: float = 1.0

    def __post_init__(self):
        _int("router.grpc_port", self.grpc_port, 1, 65535)
        _int("router.http_port", self.http_port, 1, 65535)
        if self.grpc_port == self.http_port:
            raise ConfigError(f"router: grpc_port and http_port must differ, both are {self.grpc_port}")
        if self.policy not in POLICIES:
            raise ConfigError(f"router.policy: must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        _text("router.slo", self.slo, optional=True)
        object.__setattr__(self, "cpus", _number("router.cpus", self.cpus, 0))
        if self.cpus == 0:
            raise ConfigError("router.cpus: must be > 0 (the router is placed by its CPU bundle)")


@dataclass(frozen=True)
class NodeGroupSpec:
    """`replicas` nodes of one role; each node is one EP group of `ep_size` ranks on one host."""

    role: str
    replicas: int = 1
    gpus_per_replica: int = 0
    ep_size: int = 1
    cpus_per_replica: float = 1.0

    def __post_init__(self):
        _int(f"{self.role}.replicas", self.replicas, 1)
        _int(f"{self.role}.gpus_per_replica", self.gpus_per_replica, 0)
        _int(f"{self.role}.ep_size", self.ep_size, 1)
        cpus = _number(f"{self.role}.cpus_per_replica", self.cpus_per_replica, 0)
        object.__setattr__(self, "cpus_per_replica", cpus)
        if self.gpus_per_replica % self.ep_size:
            raise ConfigError(f"{self.role}: gpus_per_replica ({self.gpus_per_replica}) must be 0 or a multiple of "
                              f"ep_size ({self.ep_size}): each EP rank gets the same number of GPUs")
        if cpus == 0 and self.gpus_per_replica == 0:
            raise ConfigError(f"{self.role}: a replica needs cpus_per_replica > 0 or gpus_per_replica > 0")

    def bundle(self) -> dict[str, float]:
        """The resources of one EP rank: one placement-group bundle."""
        out = {}
        if self.cpus_per_replica:
            out["CPU"] = self.cpus_per_replica / self.ep_size
        if self.gpus_per_replica:
            out["GPU"] = self.gpus_per_replica / self.ep_size
        return out

    def bundles(self) -> list[dict[str, float]]:
        return [self.bundle() for _ in range(self.ep_size)]


@dataclass(frozen=True)
class RestartSpec:
    max_restarts: int = 3  # per actor; -1: restart forever

    def __post_init__(self):
        _int("restart.max_restarts", self.max_restarts, -1)


@dataclass(frozen=True)
class RayClusterConfig:
    model: str
    load_format: str = "auto"
    engine_args: tuple[str, ...] = ()
    redis_url: str | None = None
    host: str = "127.0.0.1"  # what every component binds; 0.0.0.0 advertises the Ray node's IP
    router: RouterSpec = field(default_factory=RouterSpec)
    prefill: NodeGroupSpec = field(default_factory=lambda: NodeGroupSpec("prefill"))
    decode: NodeGroupSpec = field(default_factory=lambda: NodeGroupSpec("decode"))
    restart: RestartSpec = field(default_factory=RestartSpec)
    startup_timeout_s: float = 900.0
    prometheus_targets: str | None = None  # write every process's /metrics here (Prometheus file_sd JSON)

    def __post_init__(self):
        _text("model", self.model)
        formats = next(s.meta["choices"] for s in settings() if s.name == "load_format")
        if self.load_format not in formats:
            raise ConfigError(f"load_format: must be {' or '.join(formats)}, got {self.load_format!r}")
        if not isinstance(self.engine_args, (list, tuple)) or not all(isinstance(a, str) for a in self.engine_args):
            raise ConfigError(f"engine_args: must be a list of strings, got {self.engine_args!r}")
        object.__setattr__(self, "engine_args", tuple(self.engine_args))
        for flag in OWNED_FLAGS:
            if any(a == flag or a.startswith(flag + "=") for a in self.engine_args):
                raise ConfigError(f"engine_args: {flag} is set by the config's own fields, not engine_args")
        try:
            node_parser().parse_args(["--model", self.model, *self.engine_args])
        except ValueError as e:
            raise ConfigError(f"engine_args: {e}") from None
        _text("redis_url", self.redis_url, optional=True)
        _text("host", self.host)
        _number("startup_timeout_s", self.startup_timeout_s, 1)
        _text("prometheus_targets", self.prometheus_targets, optional=True)
        if (self.prefill.role, self.decode.role) != ("prefill", "decode"):
            raise ConfigError("prefill/decode: node groups are in the wrong sections")

    def cpus_needed(self) -> float:
        """Ray CPUs the whole cluster reserves."""
        groups = (self.prefill, self.decode)
        return self.router.cpus + sum(g.replicas * g.cpus_per_replica for g in groups)

    @classmethod
    def from_dict(cls, data: dict) -> "RayClusterConfig":
        sections = ("router", "prefill", "decode", "restart")
        top = _fields_of(data, cls, "config", nested=sections)
        if "model" not in top:
            raise ConfigError("model: required (a preset name, see `pdserve presets`, or a checkpoint directory)")
        router = RouterSpec(**_fields_of(data.get("router") or {}, RouterSpec, "router"))
        groups = {role: NodeGroupSpec(role, **_fields_of(data.get(role) or {}, NodeGroupSpec, role, skip=("role",)))
                  for role in ("prefill", "decode")}
        restart = RestartSpec(**_fields_of(data.get("restart") or {}, RestartSpec, "restart"))
        return cls(**top, router=router, prefill=groups["prefill"], decode=groups["decode"], restart=restart)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RayClusterConfig":
        import yaml

        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        try:
            return cls.from_dict(data)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from None


def _fields_of(section, cls, where: str, nested: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> dict:
    """The keys of `section` that are plain fields of `cls`; any key that is neither such a field nor one
    of the `nested` sections is an error naming the allowed keys."""
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: must be a mapping, got {section!r}")
    plain = [f.name for f in fields(cls) if f.name not in nested and f.name not in skip]
    for key in section:
        if key not in plain and key not in nested:
            raise ConfigError(f"{where}: unknown key {key!r} (allowed: {', '.join(plain + list(nested))})")
    return {k: v for k, v in section.items() if k in plain}
