"""The study's five conditions as recipes: the reference card's common settings (``STUDY_DEFAULTS``), each
condition's own (``RECIPES``, the one place its values live: ``recipes/<name>.py`` runs ``RECIPES[name]``), and the
command-line entry points. Options come from three dataclasses parsed by TRL's ``TrlParser``: ``StudyArguments``
(the runner's: data, evaluation, reward, checkpoints), ``SparkGRPOConfig`` (the trainer's) and TRL's
``ModelConfig``; a ``--config`` YAML overrides the defaults and flags override both."""

from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

# The reference card's settings, common to the five recipes. Each recipe adds its own few.
STUDY_DEFAULTS: dict[str, Any] = dict(
    model_name_or_path="Qwen/Qwen2.5-Coder-3B-Instruct",
    dtype="bfloat16",
    load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True,
    use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.05,
    lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    optim="adamw_torch", learning_rate=5e-6, weight_decay=0.01, lr_scheduler_type="constant", warmup_steps=0,
    # The study's schedule: every problem's rollouts, then one pass with an optimizer step every 4 sequences in the
    # loss (its "grad_accum=4": 4 one-sequence backwards; here one micro-batch of 4, the same gradient).
    rollout_schedule="epoch", per_device_train_batch_size=4, gradient_accumulation_steps=1,
    skip_zero_advantage="sequence",  # "every 4 sequences with a non-zero advantage": its exact rule
    steps_per_generation=4,  # generation in chunks of 16 completions (4 prompts) per process
    epsilon=0.2, max_grad_norm=1.0,
    min_generations=4, max_generations=8, generation_increment=2,
    temperature=1.0, top_p=0.98, max_completion_length=512,
    loss_type="spark", gradient_checkpointing=True, rollout_engine="auto",
    reward_mode="study",  # the study's penalties are StudyArguments' defaults (spark_trl.reward.STUDY_PENALTIES)
    seed=42, report_to="none",
)


def recipe_parser(recipe: dict[str, Any]):
    """A ``TrlParser`` over (StudyArguments, SparkGRPOConfig, ModelConfig) whose defaults are the card's common
    settings updated with ``recipe``. A ``--config`` YAML overrides these defaults; flags override both."""
    from trl import ModelConfig, TrlParser

    from .configs import SparkGRPOConfig
    from .runner import StudyArguments

    import torch

    parser = TrlParser((StudyArguments, SparkGRPOConfig, ModelConfig))
    parser.description = ("Run a SPARK-Code study condition: GRPO iterations with execution rewards, each followed by "
                          "a HumanEval / held-out MBPP evaluation and a checkpoint.")
    parser.epilog = ("--config FILE.yaml sets any of these options from a YAML mapping (flags given on the command "
                     "line win). Resume an interrupted run with the same command plus --resume.")
    defaults = dict(STUDY_DEFAULTS)
    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        # TRL defaults to bf16 mixed precision, which refuses to start on a CPU or a pre-Ampere GPU.
        defaults["bf16"] = False
    unknown = parser.set_defaults_with_config(**{**defaults, **recipe})
    if unknown:
        raise ValueError(f"recipe sets unknown options: {unknown[::2]}")
    return parser


def parse_recipe(recipe: dict[str, Any], argv: Sequence[str] | None = None):
    """(StudyArguments, SparkGRPOConfig, ModelConfig) of a recipe, from its defaults, a YAML and the flags."""
    return recipe_parser(recipe).parse_args_and_config(args=argv)


def recipe_main(recipe: dict[str, Any], argv: Sequence[str] | None = None) -> int:
    """Entry point of a ``recipes/*.py`` script: parse, run the study, return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        study, training_args, model_args = parse_recipe(recipe, argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .checkpoints import is_main_process
    from .data import DataError
    from .models import ModelLoadError
    from .results import results_table
    from .runner import StudyError, run_study

    try:
        result = run_study(study, training_args, model_args)
    except (StudyError, ModelLoadError, DataError) as exc:  # bad input: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.get("benchmarks") and is_main_process():
        print("\n" + results_table(result["rows"], result["benchmarks"]), flush=True)
    return result["exit_code"]


def train_main(argv: list[str] | None = None) -> int:
    """``spark-trl train``: run a recipe by name (``--recipe condition_a``) or the common defaults."""
    argv = list(argv or [])
    recipe: dict[str, Any] = {}
    if "--recipe" in argv:
        i = argv.index("--recipe")
        name = argv[i + 1] if i + 1 < len(argv) else ""
        del argv[i:i + 2]
        if name not in RECIPES:
            print(f"error: unknown recipe {name!r}; choose one of {', '.join(RECIPES)}", file=sys.stderr)
            return 2
        recipe = RECIPES[name]
    return recipe_main(recipe, argv)


# The five conditions of the study; recipes/<name>.py runs each. Output dirs default to runs/<name>.
RECIPES: dict[str, dict[str, Any]] = {
    "condition_a": dict(output_dir="runs/condition_a", max_train_problems=200, iterations=3, beta=0.01),
    "condition_a_v2": dict(output_dir="runs/condition_a_v2", max_train_problems=311, iterations=6, beta=0.02),
    "condition_c_reg": dict(output_dir="runs/condition_c_reg", max_train_problems=200, iterations=3, beta=0.02,
                            aux_objective="recycling", aux_loss_scale=0.03),
    "condition_c_light": dict(output_dir="runs/condition_c_light", max_train_problems=200, iterations=3,
                              beta=0.01, aux_objective="recycling", aux_loss_scale=0.10),
    "condition_c_reg2": dict(output_dir="runs/condition_c_reg2", max_train_problems=311, iterations=6, beta=0.03,
                             aux_objective="recycling", aux_loss_scale=0.02, aux_pairwise_weight=0.05),
}
