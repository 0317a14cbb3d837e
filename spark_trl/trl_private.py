"""Every private name of TRL's `GRPOTrainer` (and of transformers' `Trainer`) that spark-trl touches, in one place.

Read from TRL 1.16.0 and transformers 5.24.0. A private name may change in any release: `check()` (run when a
`SparkGRPOTrainer` is built) names what moved, and tests/test_trl_private.py fails loudly on it. Everything else in
spark-trl reaches these names through the functions below, never directly, so that this file is the whole list.

Public attributes that `GRPOTrainer.__init__` sets (`reward_funcs`, `reward_weights`, `reward_func_names`,
`eos_token_ids`, `pad_to_multiple_of`, `mask_truncated_completions`, `log_completions`, `num_iterations`,
`epsilon_low`, `epsilon_high`, `beta`, `loss_type`, `ref_model`) are used directly, and so are the helpers
named in `TRL_HELPERS` (public modules, no leading underscore, but not documented API: checked too).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect

TRL_VERSION_READ = "1.16.0"
TRANSFORMERS_VERSION_READ = "5.24.0"

# Methods that SparkGRPOTrainer overrides or calls: name -> the parameters (after self) it relies on.
GRPO_METHODS = {
    # overridden
    "_generate_and_score_completions": ("inputs",),
    "_compute_loss": ("model", "inputs"),
    "_prepare_inputs": ("generation_batch",),
    "_get_train_sampler": ("dataset",),
    # called
    "_calculate_rewards": ("inputs", "prompts", "completions", "completion_ids_list"),
    "_tokenize_prompts": ("prompts",),
    "_generate_single_turn": ("prompt_ids", "images", "multimodal_fields", "num_generations"),
    "_get_per_token_logps_and_entropies": ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size"),
}
# The calls spark_trl.profiling.StepProfiler times (wrapped on a trainer instance, never on the class).
GENERATION_METHOD = "_generate_single_turn"
REWARD_METHOD = "_calculate_rewards"
LOGPS_METHOD = "_get_per_token_logps_and_entropies"
# Attributes that GRPOTrainer.__init__ sets and spark-trl reads or writes.
GRPO_ATTRIBUTES = ("_metrics", "_logs", "_pending_metrics", "_pending_extra_logs", "_step")
# Module-level names of trl.trainer.grpo_trainer: `gather` ends `_calculate_rewards` (see `local_rewards`).
GRPO_MODULE_NAMES = ("gather",)
# transformers.Trainer: methods the study runner's checkpoints reuse, and the logging bookkeeping that the epoch
# schedule moves with `state.global_step`.
TRAINER_METHODS = ("_save_optimizer_and_scheduler", "_save_scaler", "_save_rng_state")
TRAINER_ATTRIBUTES = ("_globalstep_last_logged",)
# module -> names imported from it
TRL_HELPERS = {"trl.trainer.utils": ("pad", "use_adapter", "RepeatSampler"),
               "trl.models.utils": ("disable_gradient_checkpointing",)}


def check(trainer=None) -> None:
    """Raise a RuntimeError naming every private that is not where it was read (with `trainer`: its attributes
    too)."""
    from transformers import Trainer
    from trl import GRPOTrainer
    from trl.trainer import grpo_trainer

    problems = []
    for name, params in GRPO_METHODS.items():
        method = getattr(GRPOTrainer, name, None)
        if method is None:
            problems.append(f"GRPOTrainer.{name} is gone")
            continue
        have = list(inspect.signature(method).parameters)[1:]
        if have[:len(params)] != list(params):
            problems.append(f"GRPOTrainer.{name} takes {have}, expected {list(params)} first")
    for name in GRPO_MODULE_NAMES:
        if not hasattr(grpo_trainer, name):
            problems.append(f"trl.trainer.grpo_trainer.{name} is gone")
    if "gather(rewards_per_func)" not in inspect.getsource(GRPOTrainer._calculate_rewards):
        problems.append("GRPOTrainer._calculate_rewards no longer ends with gather(rewards_per_func)")
    loss_source = inspect.getsource(GRPOTrainer._compute_loss)
    if SAMPLER_CORRECTION_LINE not in loss_source or loss_source.count("self.use_vllm") != 1:
        problems.append("GRPOTrainer._compute_loss no longer weighs its per-token loss by importance_sampling_ratio "
                        "under `self.use_vllm and self.vllm_importance_sampling_correction` alone (or reads use_vllm elsewhere)")
    for module, names in TRL_HELPERS.items():
        imported = importlib.import_module(module)
        problems += [f"{module}.{name} is gone" for name in names if not hasattr(imported, name)]
    for name in TRAINER_METHODS:
        if not hasattr(Trainer, name):
            problems.append(f"transformers.Trainer.{name} is gone")
    for name in TRAINER_ATTRIBUTES:  # set when training starts: look for it where the logged loss is computed
        if f"self.{name}" not in inspect.getsource(Trainer._maybe_log_save_evaluate):
            problems.append(f"transformers.Trainer._maybe_log_save_evaluate no longer reads self.{name}")
    if trainer is not None:
        for name in GRPO_ATTRIBUTES:
            if not hasattr(trainer, name):
                problems.append(f"the trainer has no attribute {name}")
    if problems:
        import transformers
        import trl

        raise RuntimeError(
            f"spark-trl was written against TRL {TRL_VERSION_READ} / transformers {TRANSFORMERS_VERSION_READ}; the "
            f"installed TRL {trl.__version__} / transformers {transformers.__version__} differ where it relies on "
            "their internals: " + "; ".join(problems) + ". See spark_trl/trl_private.py.")


# ------------------------------------------------------------------------------------------ generation and reward

def tokenize_prompts(trainer, prompts: list) -> list[list[int]]:
    """Prompt token ids as TRL builds them (chat template, `chat_template_kwargs`, tools)."""
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
    return [list(p) for p in prompt_ids]


def generate(trainer, prompt_ids: list[list[int]], per_prompt: int) -> list[list[int]]:
    """Completion ids from TRL's backend (transformers generate, continuous batching or vLLM); `per_prompt` is the
    number of contiguous repeats of each prompt (vLLM server mode de-duplicates by it)."""
    completion_ids, _ = trainer._generate_single_turn(prompt_ids, None, {}, per_prompt)
    return [list(c) for c in completion_ids]


@contextlib.contextmanager
def local_rewards():
    """TRL's `_calculate_rewards` ends with `gather(rewards_per_func)` (a module-level name of
    `trl.trainer.grpo_trainer`) because its groups may straddle ranks. spark-trl's groups are whole on each rank and
    its top-up rounds score different numbers of completions per rank, which an all-gather cannot take; so the
    gather is the identity for the duration of the call and the trainer reduces what it needs itself."""
    from trl.trainer import grpo_trainer

    original = grpo_trainer.gather
    grpo_trainer.gather = lambda tensor: tensor
    try:
        yield
    finally:
        grpo_trainer.gather = original


def calculate_rewards(trainer, rows: list[dict], prompts: list, completions: list, completion_ids: list):
    """Rewards (n, reward functions) of this rank's completions only, through TRL's `_calculate_rewards` (which
    passes `log_extra`, `log_metric` and `trainer_state` to the reward functions)."""
    with local_rewards():
        return trainer._calculate_rewards(rows, prompts, completions, completion_ids)


def per_token_logps(trainer, model, input_ids, attention_mask, logits_to_keep: int, batch_size: int | None = None):
    """Per-token log-probs of the completion tokens, in chunks of `batch_size` rows (one forward per chunk)."""
    logps, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                            batch_size=batch_size)
    return logps


def wrap_method(trainer, name: str, wrap) -> None:
    """Replace the private method `name` (one of the listed GRPO_METHODS) on this trainer instance by
    `wrap(bound method)`; the class and every other trainer keep TRL's."""
    if name not in GRPO_METHODS:
        raise ValueError(f"{name} is not one of the TRL privates listed in spark_trl/trl_private.py")
    setattr(trainer, name, wrap(getattr(trainer, name)))


# The line of GRPOTrainer._compute_loss that `sampler_correction_in_loss` relies on.
SAMPLER_CORRECTION_LINE = ('if self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo":\n'
                           '            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]')


@contextlib.contextmanager
def sampler_correction_in_loss(trainer, on: bool):
    """TRL's `_compute_loss` multiplies the per-token loss by `inputs["importance_sampling_ratio"]` only when
    `use_vllm` (SAMPLER_CORRECTION_LINE; VESPO reads the ratio from the inputs whatever `use_vllm` says). For the
    fast engine's rollouts the trainer computes that ratio itself, so `use_vllm` reads True for the duration of
    the call; `_compute_loss` reads it nowhere else (`check()` verifies both)."""
    if not on:
        yield
        return
    saved = trainer.use_vllm
    trainer.use_vllm = True
    try:
        yield
    finally:
        trainer.use_vllm = saved


# ------------------------------------------------------------------------------------------------- bookkeeping

def metrics(trainer, mode: str = "train") -> dict:
    """TRL's per-step metrics (name -> list of values averaged at the next log)."""
    return trainer._metrics[mode]


def completion_logs(trainer) -> dict:
    """TRL's completions table (deques of prompts, completions, rewards, advantages, extra columns)."""
    return trainer._logs


def take_reward_metrics(trainer) -> dict[str, list]:
    """What the reward functions reported through `log_metric` since the last call (cleared)."""
    pending = {k: list(v) for k, v in trainer._pending_metrics.items()}
    trainer._pending_metrics.clear()
    return pending


def take_reward_extra(trainer) -> dict[str, list]:
    """What the reward functions reported through `log_extra` since the last call (cleared)."""
    pending = {k: list(v) for k, v in trainer._pending_extra_logs.items()}
    trainer._pending_extra_logs.clear()
    return pending


def micro_step(trainer) -> int:
    """TRL's count of training micro-steps (it picks the slice of the buffered generation batch)."""
    return trainer._step


def count_micro_step(trainer) -> None:
    """Count a micro-step that ran without `GRPOTrainer.training_step` (a skipped one)."""
    trainer._step += 1


def move_global_step(trainer, step: int) -> None:
    """Set `state.global_step`, keeping the Trainer's logging bookkeeping consistent (its logged loss is the loss
    accumulated since the last log divided by the steps since then)."""
    trainer.state.global_step = step
    trainer._globalstep_last_logged = step


def save_training_state(trainer, directory: str) -> None:
    """Optimizer, scheduler, scaler and RNG states as `Trainer._save_checkpoint` writes them (they know the
    FSDP/DeepSpeed/per-rank layouts)."""
    trainer._save_optimizer_and_scheduler(directory)
    trainer._save_scaler(directory)
    trainer._save_rng_state(directory)
