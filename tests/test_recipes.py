"""The five recipes: their effective configuration is the reference card's, and every setting can be overridden
from a YAML config and from the command line (flags win)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spark_trl.runner import RECIPES, parse_recipe, recipe_parser

REPO = Path(__file__).resolve().parents[1]
NAMES = ["condition_a", "condition_a_v2", "condition_c_reg", "condition_c_light", "condition_c_reg2"]
# Per condition, from the reference card's comparison table: pool, iterations, aux_loss_scale, kl_coeff.
CARD = {
    "condition_a": (200, 3, 0.0, 0.01),
    "condition_a_v2": (311, 6, 0.0, 0.02),
    "condition_c_reg": (200, 3, 0.03, 0.02),
    "condition_c_light": (200, 3, 0.10, 0.01),
    "condition_c_reg2": (311, 6, 0.02, 0.03),
}


def _recipe(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the `if __name__ == "__main__"` guard keeps it from running
    return module.RECIPE


@pytest.mark.parametrize("name", NAMES)
def test_recipe_matches_the_reference_card(name):
    recipe = _recipe(name)
    assert recipe == RECIPES[name]  # `spark-trl train --recipe` runs exactly what the script runs
    study, args, model = parse_recipe(recipe, [])
    pool, iterations, aux, kl = CARD[name]
    assert (study.max_train_problems, study.iterations, args.aux_loss_scale, args.beta) == (pool, iterations, aux, kl)
    assert args.aux_objective == ("recycling" if aux else None)
    assert args.aux_pairwise_weight == (0.05 if name == "condition_c_reg2" else 0.1)
    # Common to all five.
    assert model.model_name_or_path == "Qwen/Qwen2.5-Coder-3B-Instruct"
    assert model.load_in_4bit and model.bnb_4bit_quant_type == "nf4" and model.use_bnb_nested_quant
    assert model.dtype == "bfloat16" and model.use_peft
    assert (model.lora_r, model.lora_alpha, model.lora_dropout) == (16, 32, 0.05)
    assert sorted(model.lora_target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert args.optim == "adamw_torch" and args.learning_rate == 5e-6 and args.weight_decay == 0.01
    assert args.lr_scheduler_type == "constant"
    # The study's schedule: all rollouts of an iteration, then an optimizer step every 4 sequences in the loss.
    assert args.rollout_schedule == "epoch"
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 4
    assert args.epsilon == 0.2 and args.max_grad_norm == 1.0
    assert (args.min_generations, args.max_generations, args.num_generations) == (4, 8, 4)
    assert (args.temperature, args.top_p, args.max_completion_length) == (1.0, 0.98, 512)
    assert (study.syntax_penalty, study.runtime_penalty, study.timeout_penalty, study.wrong_answer_floor) == (
        -0.2, -0.1, -0.3, 0.0)
    assert args.seed == 42 and args.loss_type == "spark"
    assert args.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert (study.eval_n_samples, study.eval_temperature, study.eval_top_p, study.eval_max_new_tokens) == (
        5, 0.2, 0.95, 512)
    assert args.output_dir.endswith(name)


def test_yaml_overrides_the_recipe_and_flags_override_the_yaml(tmp_path):
    config = tmp_path / "smoke.yaml"
    config.write_text("max_train_problems: 8\niterations: 1\nbeta: 0.05\nlora_r: 8\nlearning_rate: 1.0e-5\n")
    study, args, model = parse_recipe(RECIPES["condition_a"], ["--config", str(config), "--lora_r", "4",
                                                               "--output_dir", str(tmp_path / "o")])
    assert (study.max_train_problems, study.iterations, args.beta, args.learning_rate) == (8, 1, 0.05, 1e-5)
    assert model.lora_r == 4 and args.output_dir == str(tmp_path / "o")
    assert model.lora_alpha == 32  # untouched settings keep the recipe's values


def test_shipped_example_configs_parse():
    configs = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
    assert configs
    for config in configs:
        study, args, _ = parse_recipe(RECIPES["condition_a"], ["--config", str(config)])
        assert study.iterations >= 1


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no_such_option"):
        parse_recipe(RECIPES["condition_a"], ["--no_such_option", "1"])
    with pytest.raises(ValueError, match="min_generations"):
        parse_recipe(RECIPES["condition_a"], ["--min_generations", "1"])
    config = tmp_path / "bad.yaml"
    config.write_text("iterations: 2\nnot_an_option: 3\n")
    with pytest.raises(ValueError, match="not_an_option"):
        parse_recipe(RECIPES["condition_a"], ["--config", str(config)])


def test_help_lists_the_options():
    text = recipe_parser(RECIPES["condition_a"]).format_help()
    for option in ("--model_name_or_path", "--output_dir", "--max_train_problems", "--iterations", "--beta",
                   "--aux_loss_scale", "--eval_limit", "--resume", "--overwrite", "--config", "--use_vllm",
                   "--load_in_4bit", "--lora_r"):
        assert option in text, option


@pytest.mark.slow
def test_accelerate_launch_runs_the_recipe_script():
    """`accelerate launch recipes/condition_a.py --help` goes through accelerate's launcher to the parser."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(REPO / "recipes" / "condition_a.py"), "--help"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--max_train_problems" in proc.stdout and "--iterations" in proc.stdout


def test_train_command_runs_recipes_by_name(tmp_path, capsys):
    from spark_trl.cli import main

    assert main(["train", "--recipe", "condition_z"]) == 2
    assert "unknown recipe 'condition_z'" in capsys.readouterr().err
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.jsonl").write_text("{}\n")
    # Refused before any model is looked up (the model does not exist).
    assert main(["train", "--recipe", "condition_c_reg", "--output_dir", str(out),
                 "--model_name_or_path", str(tmp_path / "no-model")]) == 2
    assert "already holds a run's results" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == "{}\n"
    assert main(["train", "--recipe", "condition_a", "--output_dir", str(tmp_path / "new"),
                 "--mbpp_path", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such data file" in capsys.readouterr().err
