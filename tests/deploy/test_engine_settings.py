"""The engine settings are declared once (engine/config.py) and everything else follows them: the
CLI flags of every command, the argv `pdserve up` forwards to its nodes, the keyword form, the Ray
config's `engine_args` and the Helm chart's node arguments."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest

from deploy.cli import _generate_parser, _node_parser, _up_parser
from deploy.node_args import node_parser
from deploy.ray.config import ConfigError, RayClusterConfig
from engine.config import EngineConfig
from engine.engine_args import build_engine_config, engine_argv, engine_kwargs, settings
from tests.deploy.test_helm import CHART, SCALED, _pod_templates, _render, helm  # noqa: F401 (fixture)

# Every engine flag the commands had before the settings were declared once, and what it parses to.
ENGINE_FLAGS = {
    "--model": "m", "--load-format": "auto", "--dtype": "auto", "--device": "auto", "--tokenizer": None,
    "--max-model-len": None, "--page-size": 16, "--num-pages": None, "--gpu-memory-utilization": 0.9,
    "--max-num-seqs": 256, "--max-num-batched-tokens": 8192, "--no-prefix-cache": True, "--enforce-eager": False,
    "--no-overlap-schedule": True, "--attention-backend": "auto", "--seed": None, "--ep-size": 1,
    "--num-redundant-experts": 0, "--eplb-interval": 0, "--eplb-window": 32, "--eplb-min-gain": 0.05,
    "--ep-nnodes": 1, "--ep-node-rank": 0, "--ep-master": None, "--ep-backend": "auto",
    "--quantization": None, "--kv-cache-dtype": "auto", "--no-progress": None,
    "--ep-dispatch-capacity": 8192, "--ep-overlap-min-tokens": 0, "--ep-two-batch-min-tokens": 0,
    "--ep-dispatch-fp8": False,
}
# The choices of the flags that have them (as the commands declared them before).
ENGINE_CHOICES = {"--load-format": ["auto", "dummy"], "--dtype": ["auto", "float32", "float16", "bfloat16"],
                  "--attention-backend": ["auto", "torch", "triton"], "--ep-backend": ["auto", "fixed", "symm", "torch",
                                                                                             "deepep"],
                  "--quantization": ["fp8"], "--kv-cache-dtype": ["auto", "fp8_e4m3"]}
NODE_ONLY_FLAGS = {"--kv-transfer-timeout": 30.0}


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = argparse.ArgumentParser().add_subparsers()
    _generate_parser(sub)
    _node_parser(sub, "prefill")
    _up_parser(sub)
    return dict(sub.choices)


def _parsed_defaults(parser: argparse.ArgumentParser) -> dict:
    args = parser.parse_args(["--model", "m"])
    return {a.option_strings[0]: getattr(args, a.dest) for a in parser._actions if hasattr(args, a.dest)}


@pytest.mark.parametrize("command", ["generate", "prefill", "up"])
def test_every_engine_flag_keeps_its_name_and_default(command):
    parser = _commands()[command]
    got = _parsed_defaults(parser)
    want = dict(ENGINE_FLAGS, **(NODE_ONLY_FLAGS if command != "generate" else {}))
    if command == "up":
        want["--load-format"] = "dummy"
    assert {f: got.get(f) for f in want} == want  # switches (--no-...) parse to the setting they turn off
    assert "--kv-transfer-timeout" in got if command != "generate" else "--kv-transfer-timeout" not in got


def test_engine_flags_keep_their_choices():
    got = {a.option_strings[0]: a.choices for a in node_parser()._actions if a.option_strings}
    assert {f: sorted(got[f]) for f in ENGINE_CHOICES} == {f: sorted(c) for f, c in ENGINE_CHOICES.items()}


def test_flag_defaults_are_the_dataclass_defaults():
    args = node_parser().parse_args(["--model", "m"])
    assert build_engine_config("m", **engine_kwargs(args)) == EngineConfig("m")
    off = node_parser().parse_args(["--model", "m", "--no-prefix-cache", "--no-overlap-schedule", "--seed", "3",
                                    "--no-progress", "--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3"])
    config = build_engine_config("m", **engine_kwargs(off))
    assert (config.cache.enable_prefix_cache, config.overlap_schedule, config.seed) == (False, False, 3)
    assert (config.load_progress, config.quantization, config.kv_cache_dtype) == (False, "fp8", "fp8_e4m3")


def test_every_setting_has_help_and_every_flag_setting_a_field():
    for s in settings():
        assert s.meta.get("help"), f"engine setting {s.name} has no help text"
    names = {s.name for s in settings()}
    dests = {a.dest for a in node_parser()._actions if a.option_strings}
    assert {s.name for s in settings() if s.flag} <= dests <= names | {
        "host", "port", "metrics_port", "redis_url", "node_name", "advertise_host", "heartbeat_ttl", "slo", "tls_cert", "tls_key", "tls_ca"}


def test_up_forwards_every_engine_setting_to_its_nodes():
    up = _commands()["up"]
    args = up.parse_args(["--device", "cpu", "--num-pages", "9", "--no-prefix-cache", "--no-overlap-schedule",
                          "--enforce-eager", "--seed", "3", "--kv-transfer-timeout", "5", "--ep-backend", "torch",
                          "--max-model-len", "96", "--eplb-min-gain", "0.25", "--quantization", "fp8",
                          "--kv-cache-dtype", "fp8_e4m3", "--no-progress"])
    forwarded = node_parser().parse_args(engine_argv(args))
    assert build_engine_config(forwarded.model, **engine_kwargs(forwarded)) == \
        build_engine_config(args.model, **engine_kwargs(args))
    assert forwarded.load_progress is False and forwarded.quantization == "fp8"
    assert engine_argv(up.parse_args([]))[:2] == ["--model", "tiny-llama"]


def test_configs_are_frozen_and_unknown_settings_refused():
    config = build_engine_config("tiny-llama", page_size=4, ep_backend="torch")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.kv_role = "decode"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache.page_size = 8
    assert dataclasses.replace(config, kv_role="decode").cache.page_size == 4
    with pytest.raises(TypeError, match="pagesize"):
        build_engine_config("tiny-llama", pagesize=4)
    with pytest.raises(ValueError, match="attention_backend"):
        build_engine_config("tiny-llama", attention_backend="flash")


@pytest.mark.parametrize("engine_args,message", [
    (["--num-page", "4"], "unrecognized arguments: --num-page"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--page-size", "four"], "invalid int value"),
])
def test_ray_engine_args_are_checked_against_the_node_flags(engine_args, message):
    with pytest.raises(ConfigError, match=f"engine_args: .*{re.escape(message)}"):
        RayClusterConfig.from_dict({"model": "m", "engine_args": engine_args})


def test_helm_load_formats_are_the_engines():
    schema = json.loads((CHART / "values.schema.json").read_text())
    declared = next(s.meta["choices"] for s in settings() if s.name == "load_format")
    assert schema["properties"]["loadFormat"]["enum"] == list(declared)


@pytest.mark.parametrize("values", [None, dict(SCALED, prefill=dict(
    SCALED["prefill"], extraArgs=["--max-num-batched-tokens", "4096", "--num-pages", "100", "--no-prefix-cache"]))],
    ids=["default", "scaled"])
def test_helm_node_arguments_are_node_flags_that_build_an_engine_config(helm, values, tmp_path):  # noqa: F811
    pods = _pod_templates(_render(helm, values, tmp_path))
    configs = {}
    for role in ("prefill", "decode"):
        args = pods[role]["spec"]["containers"][0]["args"]
        assert args[0] == role
        # Kubernetes fills $(VAR) from the pod's environment; stand-ins of the right kind here.
        argv = [re.sub(r"\$\((LWS_WORKER_INDEX)\)", "1", a) for a in args[1:]]
        argv = [re.sub(r"\$\([A-Z_]+\)", "10.0.0.1", a) for a in argv]
        parsed = node_parser().parse_args(argv)
        configs[role] = build_engine_config(parsed.model, **engine_kwargs(parsed))
        assert configs[role].load_format == "dummy"
    if values:
        assert (configs["prefill"].cache.num_pages, configs["prefill"].cache.enable_prefix_cache) == (100, False)
        assert configs["decode"].parallel.ep_nnodes == 4 and configs["decode"].parallel.ep_master == "10.0.0.1:29500"
