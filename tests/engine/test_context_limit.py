"""The engine's context limit stays within the positions the model can encode: a longer
--max-model-len is refused at config time (before weights load), naming the model, its limit and
the flag; YaRN scaling extends the limit the way HF configs mean it (factor x original context).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from engine import LLM, SamplingParams
from engine.config import ConfigError, ModelConfig
from engine.presets import preset_config, resolve_model
from engine.rope_config import position_limit

# Qwen2.5's model card: add this YaRN block to config.json (max_position_embeddings stays 32768)
# to serve 131,072 tokens.
QWEN_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


@pytest.mark.parametrize("name,limit", [
    ("deepseek-v3", 163840),  # 40 x 4096, also its max_position_embeddings
    ("deepseek-v2-lite", 163840),
    ("qwen3-8b", 40960),
    ("llama-3-8b", 8192),
    ("tiny-llama", 2048),
])
def test_published_configs_position_their_max_position_embeddings(name, limit):
    assert position_limit(preset_config(name))[0] == limit == resolve_model(name).max_model_len


def test_yarn_extends_a_config_that_keeps_the_original_max_position_embeddings():
    hf = dict(preset_config("qwen3-8b"), max_position_embeddings=32768, rope_scaling=QWEN_YARN)
    limit, source = position_limit(hf)
    assert limit == 131072 and "YaRN" in source
    mc = ModelConfig(hf=hf)
    assert mc.check_max_model_len(131072, "qwen-yarn") == 131072
    with pytest.raises(ConfigError, match="131072"):
        mc.check_max_model_len(131073, "qwen-yarn")
    plain = ModelConfig(hf=dict(hf, rope_scaling=None))
    with pytest.raises(ConfigError, match="max_position_embeddings 32768"):
        plain.check_max_model_len(32769, "qwen")


def test_engine_refuses_a_max_model_len_beyond_the_rotary_table():
    with pytest.raises(ConfigError) as e:
        LLM("tiny-llama", load_format="dummy", page_size=4, num_pages=64, max_model_len=4096)
    assert all(s in str(e.value) for s in ("tiny-llama", "2048", "--max-model-len 4096"))
    llm = LLM("tiny-llama", load_format="dummy", page_size=4, num_pages=64, max_model_len=2048)
    assert llm.core.max_model_len == 2048 and llm.core.runner.model.rope.cos.shape[0] >= 2048


def test_yarn_extended_engine_decodes_past_max_position_embeddings():
    hf = dict(preset_config("tiny-qwen3"), max_position_embeddings=256,
              rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256})
    llm = LLM("tiny-qwen3", model_config=ModelConfig(hf=hf), load_format="dummy", page_size=4, num_pages=160,
              max_model_len=512)
    assert llm.core.runner.model.rope.cos.shape[0] >= 512
    out = llm.generate(prompt_token_ids=[[7] * 300], sampling_params=SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_pdserve_up_refuses_before_starting_any_process():
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "up", "--model", "tiny-qwen3", "--max-model-len", "4096",
                        "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "tiny-qwen3" in r.stderr and "2048" in r.stderr and "--max-model-len" in r.stderr
    assert "loading" not in r.stderr  # no node was started


def test_the_launchers_model_check_and_engine_settings_do_not_import_torch():
    """`pdserve up` and the node commands check the model before anything starts, and a node's front
    builds its engine settings, without torch: importing it costs seconds of every process start."""
    code = ("import sys\n"
            "from engine.presets import check_model\n"
            "from engine.config import ConfigError\n"
            "from engine.engine_args import build_engine_config\n"
            "check_model('tiny-llama', None)\n"
            "try:\n"
            "    check_model('qwen3-8b', 10**7)\n"
            "    raise SystemExit('an impossible context was accepted')\n"
            "except ConfigError:\n"
            "    pass\n"
            "build_engine_config('tiny-llama', page_size=4)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
