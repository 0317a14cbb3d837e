"""The checks `SparkGRPOTrainer` runs on its arguments before a model is loaded, so that a wrong combination fails
in a second with a message that says what to change, not after minutes of loading or in the middle of training.

`validate` is the whole list; `SparkGRPOConfig.__post_init__` checks what a config alone decides, and runs again
here (`check_group_sizes`, `check_sampler_correction`) because a config is a mutable dataclass.
"""

from __future__ import annotations

import os

from .configs import check_group_sizes, check_sampler_correction


def validate(args, reward_funcs, train_dataset, aux_objective, tools, rollout_func, environment_factory) -> None:
    """Raises ValueError on any combination of `SparkGRPOTrainer`'s arguments that it does not support.

    Example:
    ```python
    >>> validate(SparkGRPOConfig("out", min_generations=4, max_generations=8), reward, dataset, None, None, None,
    ...          None)
    ```
    """
    check_group_sizes(args)
    if args.num_generations != args.min_generations:
        raise ValueError(
            f"num_generations ({args.num_generations}) must equal min_generations ({args.min_generations})")
    if args.aux_loss_scale > 0 and aux_objective is None and args.aux_objective is None:
        raise ValueError(
            f"aux_loss_scale={args.aux_loss_scale} but no auxiliary objective: pass aux_objective=... or set "
            "aux_objective='recycling' (the study's built-in), or set aux_loss_scale=0 (Condition A).")
    needs_spark_path = (args.adaptive or args.skip_zero_advantage != "none" or args.loss_type == "spark"
                        or args.aux_loss_scale > 0 or args.rollout_engine == "spark")
    if needs_spark_path and (tools or rollout_func or environment_factory):
        raise ValueError(
            "Adaptive groups, skip_zero_advantage, loss_type='spark', auxiliary objectives and the spark rollout "
            "engine work with plain text or chat prompts only, not with tools, rollout_func or "
            "environment_factory. Set min_generations=max_generations, skip_zero_advantage='none', a TRL "
            "loss_type, aux_loss_scale=0 and rollout_engine='trl' to use those.")
    if args.aux_loss_scale > 0 and args.aux_mode == "phase" and uses_deepspeed(args):
        raise ValueError(
            "aux_mode='phase' does not work under DeepSpeed: its engine steps the optimizer at its own gradient "
            "accumulation boundary (every gradient_accumulation_steps backward passes), not after each "
            "auxiliary micro-batch as the phase does. Use aux_mode='joint', or DDP/FSDP.")
    if args.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError("SparkGRPOTrainer supports multi_objective_aggregation='sum_then_normalize' only")
    if args.scale_rewards not in ("group", "none"):
        raise ValueError(
            f"scale_rewards={args.scale_rewards!r}: SparkGRPOTrainer normalises within each (possibly topped-up) "
            "group; use 'group' or 'none'")
    check_sampler_correction(args)
    local_batch = args.per_device_train_batch_size * args.steps_per_generation
    if local_batch % args.min_generations != 0:
        raise ValueError(
            f"per_device_train_batch_size * steps_per_generation ({local_batch}) must be a multiple of "
            f"min_generations ({args.min_generations}): SparkGRPOTrainer keeps every group on one process")
    if args.rollout_engine == "spark":
        if args.use_vllm:
            raise ValueError("rollout_engine='spark' and use_vllm=True are two different generation backends")
        try:
            from .rollout import FastRolloutEngine  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                "rollout_engine='spark' needs spark_trl.rollout.FastRolloutEngine, which cannot be imported "
                f"({exc}). Use rollout_engine='trl'.") from None
    check_columns(reward_funcs, train_dataset, aux_objective)


def uses_deepspeed(args) -> bool:
    """Whether the run will use DeepSpeed: set in the config, or announced by `accelerate launch` (which reads a
    DeepSpeed config into the environment before the trainer exists)."""
    return bool(getattr(args, "deepspeed", None)) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in (
        "1", "true", "yes")


def check_columns(reward_funcs, train_dataset, aux_objective) -> None:
    """The dataset columns that the reward functions (`required_columns`, as ExecutionReward declares them) and the
    auxiliary objective read."""
    columns = getattr(train_dataset, "column_names", None)
    if columns is None:
        return
    funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
    needs = [(getattr(f, "__name__", type(f).__name__), tuple(getattr(f, "required_columns", None) or ()))
             for f in funcs if f is not None and not isinstance(f, str)]
    if aux_objective is not None:
        needs.append((type(aux_objective).__name__, tuple(aux_objective.required_columns)))
    for name, required in needs:
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(f"The train dataset lacks the column(s) {missing} that {name} needs (it has {columns}). "
                             "Build it with spark_trl.data.to_grpo_dataset.")
