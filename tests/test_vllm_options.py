"""TRL's vLLM options (colocate and server mode) pass through the recipes unchanged. (The accelerate, FSDP and
DeepSpeed configs of recipes/accelerate/ are tested in test_accelerate_configs.py.)

vLLM cannot be installed on the CI machines, so these tests stop where TRL takes over: the options given on a
recipe's command line (or in its YAML config) reach the `SparkGRPOConfig` that the trainer receives, and that
config passes SparkGRPOTrainer's own checks. docs/distributed.md says how to run both modes on GPUs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml
from trl import GRPOConfig

from spark_trl import SparkGRPOConfig
from spark_trl.runner import parse_recipe
from spark_trl.trainer_checks import validate

REPO = Path(__file__).resolve().parents[1]
RECIPE_FILES = sorted((REPO / "recipes").glob("condition_*.py"))

SERVER = {"use_vllm": True, "vllm_mode": "server", "vllm_server_host": "10.1.2.3", "vllm_server_port": 8123,
          "vllm_server_timeout": 600.0, "vllm_group_port": 51999}
COLOCATE = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.45,
            "vllm_tensor_parallel_size": 2, "vllm_enable_sleep_mode": True, "vllm_max_model_length": 1536}


def _recipe(path: Path) -> dict:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the `if __name__ == "__main__"` guard keeps it from running
    return module.RECIPE


def _flags(options: dict) -> list[str]:
    argv = []
    for name, value in options.items():
        argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def _check_spark_trainer_accepts(args: SparkGRPOConfig) -> None:
    # The checks SparkGRPOTrainer runs before loading a model; TRL's own (vLLM installed, server reachable)
    # follow in GRPOTrainer.__init__ and need a GPU machine.
    validate(args, None, None, None, None, None, None)


def test_there_are_recipes():
    assert len(RECIPE_FILES) == 5, [p.name for p in RECIPE_FILES]


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("options", [SERVER, COLOCATE], ids=["server", "colocate"])
def test_vllm_flags_reach_the_trainer_config(path, options):
    _, args, _ = parse_recipe(_recipe(path), ["--output_dir", "unused"] + _flags(options))
    assert isinstance(args, SparkGRPOConfig)
    assert {k: getattr(args, k) for k in options} == options
    _check_spark_trainer_accepts(args)


def test_vllm_options_from_a_yaml_config(tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump(SERVER))
    _, args, _ = parse_recipe(_recipe(RECIPE_FILES[0]), ["--config", str(config), "--vllm_server_port", "9000"])
    assert {k: getattr(args, k) for k in SERVER} == {**SERVER, "vllm_server_port": 9000}  # flags win over YAML


def test_every_trl_vllm_option_passes_through_unchanged():
    """Every `vllm_*` field of the installed TRL's GRPOConfig, set to a value other than its default, arrives as
    given: the recipes neither drop nor rewrite any of them (a future TRL option included)."""
    # Deprecated aliases (vllm_importance_sampling_cap) are rewritten by TRL itself into their replacement.
    fields = [f for f in dataclasses.fields(GRPOConfig)
              if f.name.startswith("vllm_") and "deprecated" not in f.metadata.get("help", "").lower()]
    assert {"vllm_mode", "vllm_server_host", "vllm_server_port", "vllm_gpu_memory_utilization"} <= {
        f.name for f in fields}
    # Values that differ from each default and that TRL's own __post_init__ accepts.
    choices = {"vllm_mode": "server", "vllm_model_impl": "transformers", "vllm_importance_sampling_mode": "token_mask"}
    options = {"use_vllm": True}
    for f in fields:
        if f.name in choices:
            options[f.name] = choices[f.name]
        elif f.type in (bool, "bool"):
            options[f.name] = not f.default
        elif "int" in str(f.type):
            options[f.name] = (f.default or 0) + 7
        elif "float" in str(f.type):
            options[f.name] = round((f.default or 0.0) + 0.125, 3)
        else:  # strings: host names, base URL, regex
            options[f.name] = "http://10.9.8.7:8011" if "url" in f.name else ("10.9.8.7" if "host" in f.name
                                                                              else "[a-z]+")
    options.pop("vllm_server_base_url")  # TRL: a base URL replaces host + port; tested on its own below
    _, args, _ = parse_recipe(_recipe(RECIPE_FILES[0]), ["--output_dir", "unused"] + _flags(options))
    assert {k: getattr(args, k) for k in options} == options
    _, args, _ = parse_recipe(_recipe(RECIPE_FILES[0]), ["--vllm_server_base_url", "http://10.9.8.7:8011"])
    assert args.vllm_server_base_url == "http://10.9.8.7:8011"


def test_unsupported_vllm_option_is_a_clear_error_before_the_model_loads():
    """The sampler correction is implemented for the fast engine's rollouts, not for vLLM's: refused when the
    recipe's options are parsed (config time), naming the option."""
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction=True with use_vllm=True"):
        parse_recipe(_recipe(RECIPE_FILES[0]), _flags({**SERVER, "vllm_importance_sampling_correction": True}))
