"""The flat view of the engine settings, derived from the dataclass fields of engine/config.py.

Each setting of `EngineConfig` and of its sections (`cache`, `scheduler`, `parallel`) has one flat
name (its field name; unique across sections). From the fields' `setting(...)` metadata this module
derives the command-line flags (`add_engine_args`), the keyword form used by `LLM`, the node
servers and the benchmarks (`build_engine_config`), the keywords of parsed flags (`engine_kwargs`)
and the argv a launcher forwards to its children (`engine_argv`). Nothing here names a setting:
add a field with its metadata and every one of these follows. It parses nothing from the
environment and starts nothing.
"""
from __future__ import annotations

import argparse
import functools
import types
import typing
from dataclasses import MISSING, Field, dataclass, fields

from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig

SECTIONS = {"cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig}
_GROUP_TITLES = {None: "engine", "cache": "engine", "scheduler": "engine",
                 "parallel": "expert parallelism (MoE models)"}


@dataclass(frozen=True)
class Setting:
    """One engine setting: where it lives (`section`, None for EngineConfig itself) and its field."""

    name: str
    section: str | None
    field: Field
    type: type  # int, float, str or bool (the Optional stripped)
    optional: bool  # None is a value of its own (e.g. max_model_len: the model's)

    @property
    def meta(self) -> typing.Mapping:
        return self.field.metadata

    @property
    def default(self):
        return self.field.default

    @property
    def flag(self) -> str | None:
        """The command-line flag, or None for a setting only code sets."""
        if not self.meta.get("cli", False):
            return None
        return self.meta.get("flag") or "--" + self.name.replace("_", "-")

    def switch_value(self) -> bool:
        """What a bool setting's flag sets: the negation of its default unless declared."""
        v = self.meta.get("switch", MISSING)
        return (not self.default) if v is MISSING else v

    def flag_default(self):
        d = self.meta.get("cli_default", MISSING)
        return self.default if d is MISSING else d


def _plain_type(hint) -> tuple[type, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _section_settings(cls, section: str | None) -> list[Setting]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if f.name in SECTIONS:
            continue
        plain, optional = _plain_type(hints[f.name])
        out.append(Setting(f.name, section, f, plain, optional))
    return out


@functools.cache
def settings() -> tuple[Setting, ...]:
    """Every engine setting, EngineConfig's own first, then each section's."""
    out = _section_settings(EngineConfig, None)
    for name, cls in SECTIONS.items():
        out += _section_settings(cls, name)
    names = [s.name for s in out]
    dup = {n for n in names if names.count(n) > 1}
    assert not dup, f"engine setting names must be unique across sections, repeated: {sorted(dup)}"
    return tuple(out)


def build_engine_config(model: str, **kwargs) -> EngineConfig:
    """EngineConfig from flat keywords (`page_size=4, ep_size=2, ...`): the form `LLM`, the CLI,
    the node servers and the benchmarks share."""
    by_name = {s.name: s for s in settings()}
    top: dict = {}
    sections: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, value in kwargs.items():
        s = by_name.get(key)
        if s is None or key == "model":
            raise TypeError(f"unknown engine setting {key!r}; known: {', '.join(sorted(by_name))}")
        (top if s.section is None else sections[s.section])[key] = value
    return EngineConfig(model=model, **top, **{name: SECTIONS[name](**kw) for name, kw in sections.items()})


def flag_settings(node: bool = True) -> list[Setting]:
    """The settings that are flags: of the node commands (`node`), or of `generate`."""
    return [s for s in settings() if s.flag and (node or not s.meta.get("node_only"))]


def add_engine_args(parser: argparse.ArgumentParser, default_model: str | None = None, node: bool = False) -> None:
    """Add the engine flags to `parser`, in its argument groups; `dest` is the setting's name."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for s in flag_settings(node):
        title = _GROUP_TITLES[s.section]
        g = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        kw: dict = {"dest": s.name, "help": s.meta.get("help") or None}
        if s.type is bool:
            g.add_argument(s.flag, action="store_const", const=s.switch_value(), default=s.default, **kw)
            continue
        if s.name == "model":
            kw.update(required=default_model is None, default=default_model)
        else:
            kw.update(type=s.type, default=s.flag_default(), metavar=s.flag[2:].upper().replace("-", "_"))
        if s.meta.get("choices"):
            kw["choices"] = [c for c in s.meta["choices"] if c is not None]
        g.add_argument(s.flag, **kw)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The flat keywords of parsed engine flags (not `model`); a flag left unset (None) where None is no
    value of its own takes the field's default."""
    out = {}
    for s in settings():
        if s.name == "model" or not hasattr(args, s.name):
            continue
        value = getattr(args, s.name)
        if value is not None or s.optional:
            out[s.name] = value
    return out


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags of `args` as command-line arguments (a launcher forwards them to its nodes)."""
    out: list[str] = []
    for s in settings():
        if not s.flag or not hasattr(args, s.name):
            continue
        value = getattr(args, s.name)
        if s.type is bool:
            if value != s.default:
                out.append(s.flag)
        elif value is not None:
            out += [s.flag, str(value)]
    return out
