"""`SparkGRPOTrainer`: TRL's `GRPOTrainer` with adaptive group sizes, cached reference log-probs, the study's loss
and an auxiliary-recycling hook.

What changes with respect to `trl.GRPOTrainer` (every override names the TRL method it replaces):

* Generation (`_generate_and_score_completions`): `min_generations` completions per prompt, then top-up rounds
  of `generation_increment` for groups whose rewards have no variance, up to `max_generations`. Groups are
  whole on each rank; every rank runs the same number of generation rounds with the same number of prompts
  (padding with throw-away prompts), so collective backends (vLLM server, ZeRO-3, FSDP) stay in lockstep.
* Sequences left out of the loss (groups without variance, by default) get no reference forward, no old-logp
  forward, no loss forward and no backward.
* Rows are rebalanced: every rank gets the same number of rows per micro-step (zero-weight padding rows), and
  the loss is normalised by the global number of sequences (or tokens) of the generation batch, so gradient
  accumulation, `steps_per_generation > 1` and several processes all see the same objective and the same number
  of forward/backward passes (`_prepare_inputs`, `_compute_loss`).
* The probability ratio is exactly 1 on every micro-step taken before the first optimizer step over a fresh
  rollout: the old log-probs are the current ones, detached, whatever dropout does (`_compute_loss`).
* `loss_type="spark"`: the study's loss (see `_spark_loss`).
* Auxiliary objective (`spark_trl.recycling`), as a phase at the end of each epoch or joint with the GRPO loss.
* `trainer.spark_stats`: per-epoch figures for a study runner (train pass rate, KL, tokens, group sizes).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object, is_peft_model
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import grpo_trainer as _trl_grpo
from trl.trainer.utils import pad, split_tensor_dict, use_adapter

from .configs import SparkGRPOConfig, check_group_sizes
from .outcome import ExecutionOutcome
from .recycling import AuxiliaryObjective, RecyclingObjective, Rollout
from .sampling import CoveringRepeatSampler


@dataclass
class SparkStats:
    """Global (all ranks) figures accumulated over one epoch; what a study runner records per iteration.

    Example:
    ```python
    >>> stats = SparkStats()
    >>> stats.summary()["train_pass_rate"] is None
    True
    ```
    """

    rollouts: int = 0  # completions generated (all rounds)
    rollouts_with_outcome: int = 0  # completions whose reward function reported an ExecutionOutcome
    rollouts_passed: int = 0  # ... of which passed every test
    completion_tokens: int = 0
    reward_sum: float = 0.0
    reward_count: int = 0
    groups: int = 0
    groups_topped_up: int = 0
    groups_without_variance: int = 0
    group_sizes: Counter = field(default_factory=Counter)
    sequences_in_loss: int = 0
    tokens_saved: float = 0.0  # estimated completion tokens not generated versus always max_generations
    kl_sum: float = 0.0  # token-weighted, over sequences in the loss
    kl_tokens: int = 0
    kl_seq_sum: float = 0.0  # sum over sequences in the loss of each sequence's token-mean KL (the card's KL)
    kl_seqs: int = 0
    optimizer_steps: int = 0  # optimizer steps taken with a gradient
    optimizer_steps_skipped: int = 0  # optimizer steps in which no rank had anything in the loss: not taken
    ref_forward_sequences: int = 0  # sequences that went through the reference forward
    aux_examples: Counter = field(default_factory=Counter)
    aux_loss_sum: float = 0.0
    aux_steps: int = 0

    def summary(self) -> dict[str, Any]:
        def ratio(a, b):
            return a / b if b else None

        return {
            "train_pass_rate": ratio(self.rollouts_passed, self.rollouts_with_outcome),
            "mean_kl": ratio(self.kl_sum, self.kl_tokens),
            "mean_kl_per_sequence": ratio(self.kl_seq_sum, self.kl_seqs),
            "mean_completion_tokens": ratio(self.completion_tokens, self.rollouts),
            "mean_reward": ratio(self.reward_sum, self.reward_count),
            "mean_group_size": ratio(sum(k * v for k, v in self.group_sizes.items()), self.groups),
            "group_sizes": {int(k): int(v) for k, v in sorted(self.group_sizes.items())},
            "frac_groups_topped_up": ratio(self.groups_topped_up, self.groups),
            "frac_groups_without_variance": ratio(self.groups_without_variance, self.groups),
            "rollouts": self.rollouts,
            "completion_tokens": self.completion_tokens,
            "tokens_saved_vs_max_generations": self.tokens_saved,
            "sequences_in_loss": self.sequences_in_loss,
            "ref_forward_sequences": self.ref_forward_sequences,
            "aux_examples": dict(self.aux_examples),
            "aux_mean_loss": ratio(self.aux_loss_sum, self.aux_steps),
            "aux_steps": self.aux_steps,
            "optimizer_steps": self.optimizer_steps,
            "optimizer_steps_skipped": self.optimizer_steps_skipped,
        }


@contextlib.contextmanager
def _local_rewards():
    """Score this rank's completions only.

    TRL's `_calculate_rewards` ends with `gather(rewards_per_func)` (a module-level name in
    `trl.trainer.grpo_trainer`) because its groups may straddle ranks. Here groups are whole on each rank and the
    top-up rounds score different numbers of completions per rank, which an all-gather cannot take; so the
    gather is made the identity for the duration of the call and the trainer reduces what it needs itself.
    """
    original = _trl_grpo.gather
    _trl_grpo.gather = lambda tensor: tensor
    try:
        yield
    finally:
        _trl_grpo.gather = original


class _SparkCallback(TrainerCallback):
    """Epoch bookkeeping. Registered before the user's callbacks, so that their `on_epoch_end` (a study runner's
    evaluation and checkpoint) sees the model after the auxiliary phase and the epoch's complete statistics."""

    def __init__(self):
        self.trainer: SparkGRPOTrainer | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._begin_epoch()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer._end_epoch()


class SparkGRPOTrainer(GRPOTrainer):
    """GRPO for execution-grounded code generation; arguments are `trl.GRPOTrainer`'s plus `aux_objective`.

    Args:
        aux_objective (`AuxiliaryObjective`, *optional*):
            An auxiliary objective fed with each epoch's rollouts (phase mode) or each generation batch's rollouts
            (joint mode); see `spark_trl.recycling`. Without one, `args.aux_objective="recycling"` builds the
            study's objective.

    Example:
    ```python
    >>> from spark_trl import SparkGRPOConfig, SparkGRPOTrainer
    >>> args = SparkGRPOConfig(output_dir="out", loss_type="spark", beta=0.02, min_generations=4,
    ...                        max_generations=8, per_device_train_batch_size=4, gradient_accumulation_steps=4)
    >>> trainer = SparkGRPOTrainer(model="Qwen/Qwen2.5-Coder-3B-Instruct", reward_funcs=reward, args=args,
    ...                            train_dataset=dataset, peft_config=lora_config)
    >>> trainer.train()
    >>> trainer.spark_stats["train_pass_rate"]
    ```
    """

    _tag_names = ["trl", "grpo", "spark-trl"]

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: SparkGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
        aux_objective: AuxiliaryObjective | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = SparkGRPOConfig(f"{str(name).split('/')[-1]}-SparkGRPO")
        if not isinstance(args, SparkGRPOConfig):
            raise TypeError(f"args must be a SparkGRPOConfig, got {type(args).__name__}")
        # Everything checkable before a model is loaded is checked here.
        self._spark_path = not (tools or rollout_func or environment_factory)
        self._validate(args, reward_funcs, train_dataset, aux_objective, tools, rollout_func, environment_factory)

        self._spark_callback = _SparkCallback()
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=[self._spark_callback] + list(callbacks or []),
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        self._spark_callback.trainer = self

        # TRL adds a frozen "ref" copy of a pre-existing adapter; the study's reference is the base model.
        unwrapped = self.accelerator.unwrap_model(self.model)
        if args.ref_adapter == "disable" and is_peft_model(unwrapped) and "ref" in unwrapped.peft_config:
            unwrapped.delete_adapter("ref")
            unwrapped.set_adapter("default")

        if aux_objective is None and args.aux_objective == "recycling":
            aux_objective = RecyclingObjective.from_config(self.processing_class, args)
        self.aux_objective = aux_objective
        self._aux_on = aux_objective is not None and args.aux_loss_scale > 0

        self._engine = None
        self._engine_synced_step = None
        if args.rollout_engine == "spark":
            from .rollout import FastRolloutEngine  # checked importable in _validate

            self._engine = FastRolloutEngine(unwrapped, self.processing_class, args)

        self._rollout_global_step = -1  # optimizer step at which the buffered rollout was generated
        self._micro_step_rows: list[int] = []  # per micro-step of the buffered batch: rows in the loss, all ranks
        self._step_had_backward = False  # whether the optimizer step in progress has run a backward yet
        self._stats = SparkStats()
        self.spark_stats_history: list[dict[str, Any]] = []
        self._epoch_rollouts: list[Rollout] = []
        self._joint_aux_batches: list[list] = []
        self._group_counter = 0
        self.ref_forward_calls = 0  # reference forward passes (batches), for tests and benchmarks

    # ------------------------------------------------------------------------------------------------ validation

    @staticmethod
    def _validate(args, reward_funcs, train_dataset, aux_objective, tools, rollout_func, environment_factory):
        # Re-check the group sizes: a config is a mutable dataclass.
        check_group_sizes(args)
        if args.num_generations != args.min_generations:
            raise ValueError(
                f"num_generations ({args.num_generations}) must equal min_generations ({args.min_generations})"
            )
        if args.aux_loss_scale > 0 and aux_objective is None and args.aux_objective is None:
            raise ValueError(
                f"aux_loss_scale={args.aux_loss_scale} but no auxiliary objective: pass aux_objective=... or set "
                "aux_objective='recycling' (the study's built-in), or set aux_loss_scale=0 (Condition A)."
            )
        needs_spark_path = (
            args.adaptive
            or args.skip_zero_advantage != "none"
            or args.loss_type == "spark"
            or args.aux_loss_scale > 0
            or args.rollout_engine == "spark"
        )
        if needs_spark_path and (tools or rollout_func or environment_factory):
            raise ValueError(
                "Adaptive groups, skip_zero_advantage, loss_type='spark', auxiliary objectives and the spark rollout "
                "engine work with plain text or chat prompts only, not with tools, rollout_func or "
                "environment_factory. Set min_generations=max_generations, skip_zero_advantage='none', a TRL "
                "loss_type, aux_loss_scale=0 and rollout_engine='trl' to use those."
            )
        if args.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("SparkGRPOTrainer supports multi_objective_aggregation='sum_then_normalize' only")
        if args.scale_rewards not in ("group", "none"):
            raise ValueError(
                f"scale_rewards={args.scale_rewards!r}: SparkGRPOTrainer normalises within each (possibly topped-up) "
                "group; use 'group' or 'none'"
            )
        if args.use_vllm and args.vllm_importance_sampling_correction:
            raise ValueError(
                "vllm_importance_sampling_correction is not supported by SparkGRPOTrainer yet; set it to False "
                "when use_vllm=True (the old log-probs are still those of the training model)"
            )
        local_batch = args.per_device_train_batch_size * args.steps_per_generation
        if local_batch % args.min_generations != 0:
            raise ValueError(
                f"per_device_train_batch_size * steps_per_generation ({local_batch}) must be a multiple of "
                f"min_generations ({args.min_generations}): SparkGRPOTrainer keeps every group on one process"
            )
        if args.rollout_engine == "spark":
            if args.use_vllm:
                raise ValueError("rollout_engine='spark' and use_vllm=True are two different generation backends")
            try:
                from .rollout import FastRolloutEngine  # noqa: F401
            except ImportError as exc:
                raise ValueError(
                    "rollout_engine='spark' needs spark_trl.rollout.FastRolloutEngine, which cannot be imported "
                    f"({exc}). Use rollout_engine='trl'."
                ) from None
        # Columns that the reward functions (and the auxiliary objective) read.
        columns = getattr(train_dataset, "column_names", None)
        if columns is not None:
            funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
            needs = [(getattr(f, "__name__", type(f).__name__), _required_columns(f))
                     for f in funcs if f is not None and not isinstance(f, str)]
            if aux_objective is not None:
                needs.append((type(aux_objective).__name__, tuple(aux_objective.required_columns)))
            for name, required in needs:
                missing = [c for c in required if c not in columns]
                if missing:
                    raise ValueError(
                        f"The train dataset lacks the column(s) {missing} that {name} needs (it has {columns}). "
                        "Build it with spark_trl.data.to_grpo_dataset."
                    )

    @property
    def rollout_engine(self):
        """The FastRolloutEngine sampling the rollouts (rollout_engine="spark"), or None. The study runner lends it
        to the evaluation (``FastRolloutEngine.sampling``) so that one dense copy of the weights serves both."""
        return self._engine

    # ------------------------------------------------------------------------------------------------ statistics

    @property
    def spark_stats(self) -> dict[str, Any]:
        """Figures of the current epoch (complete when a callback's `on_epoch_end` runs): train pass rate, mean KL,
        mean completion tokens, group sizes, ... Past epochs are in `spark_stats_history`."""
        return self._stats.summary()

    def reset_spark_stats(self) -> None:
        """Start accumulating `spark_stats` afresh (done automatically at the start of every epoch)."""
        self._stats = SparkStats()

    def _begin_epoch(self):
        self.reset_spark_stats()
        self._epoch_rollouts = []

    def _end_epoch(self):
        if self._aux_on and self.args.aux_mode == "phase":
            self._run_aux_phase()
        summary = self.spark_stats
        summary["epoch"] = self.state.epoch
        self.spark_stats_history.append(summary)
        flat = {f"spark/epoch/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}
        self.log(flat)

    def _reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    def _reduce_max(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return int(value)
        t = torch.tensor([value], dtype=torch.long, device=self.accelerator.device)
        return int(self.accelerator.gather(t).max().item())

    # ------------------------------------------------------------------------------------------------ generation

    def _get_train_sampler(self, dataset=None):
        # Replaces GRPOTrainer._get_train_sampler: the same sampler without the dropped remainder, so that every
        # problem of an epoch is trained on (see spark_trl.sampling).
        sampler = super()._get_train_sampler(dataset)
        if not self._spark_path:
            return sampler
        return CoveringRepeatSampler(sampler.data_source, sampler.mini_repeat_count, sampler.batch_size,
                                     sampler.repeat_count, sampler.shuffle, sampler.seed)

    def training_step(self, model, inputs, num_items_in_batch):
        # Wraps GRPOTrainer.training_step: a micro-step in which no rank has anything in the loss runs no forward
        # and no backward, so that an optimizer step without any leaves every gradient None and AdamW (which skips
        # parameters without a gradient) moves nothing: no momentum, no weight decay. Every rank decides alike.
        if not self._spark_path:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()  # as Trainer.training_step does before preparing the inputs
        batch = self._prepare_inputs(inputs)
        sync = self.accelerator.sync_gradients  # the last micro-step of the optimizer step
        empty = self._micro_step_rows[self._step % self.args.steps_per_generation] == 0
        # A step whose earlier micro-steps ran a backward must still run its last one: the gradient all-reduce
        # (DDP) or reduce-scatter (FSDP) happens there. DeepSpeed counts backward calls to find its accumulation
        # boundary, so under DeepSpeed nothing is skipped.
        skip = empty and not (sync and self._step_had_backward) and not self.is_deepspeed_enabled
        if skip:
            self._step += 1  # what GRPOTrainer.training_step counts
            loss = torch.zeros((), device=self.accelerator.device)
        else:
            loss = super().training_step(model, batch, num_items_in_batch)
            self._step_had_backward = True
        if sync:
            if self._step_had_backward:
                self._stats.optimizer_steps += 1
            else:
                self._stats.optimizer_steps_skipped += 1
                self._metrics["train"]["spark/optimizer_step_skipped"].append(1.0)
            self._step_had_backward = False
        return loss

    def _prepare_inputs(self, generation_batch):
        # Replaces GRPOTrainer._prepare_inputs in training: the generation batch comes back already shuffled and
        # ordered into steps_per_generation equal micro-batches (TRL's shuffle + split would drop the remainder
        # rows of a batch whose size varies with the top-ups).
        if not (self._spark_path and self.model.training):
            return super()._prepare_inputs(generation_batch)
        if isinstance(generation_batch, dict):  # a micro-batch that training_step has already prepared
            return generation_batch
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _generate_round(self, prompts: list, per_prompt: int) -> tuple[list, list, list]:
        """One call of the generation backend: `prompts` holds each prompt `per_prompt` times in a row."""
        prompt_ids, _, _ = self._tokenize_prompts(prompts)
        if self._engine is not None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            if self._engine_synced_step != self.state.global_step:
                self._engine.sync_weights(unwrapped)
                self._engine_synced_step = self.state.global_step
            completion_ids = [list(c) for c in self._engine.generate([list(p) for p in prompt_ids])]
            if len(completion_ids) != len(prompt_ids):
                raise RuntimeError(
                    f"FastRolloutEngine.generate returned {len(completion_ids)} completions for {len(prompt_ids)} "
                    "prompts; it must return one per prompt"
                )
        else:
            # TRL's backend: transformers generate, continuous batching, or vLLM (whose server mode de-duplicates
            # prompts by taking every `per_prompt`-th one, hence the contiguous repeats).
            completion_ids, _ = self._generate_single_turn(prompt_ids, None, {}, per_prompt)
        contents = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": c}] for c in contents]
        else:
            completions = contents
        return [list(p) for p in prompt_ids], [list(c) for c in completion_ids], completions

    def _score(self, rows, prompts, completions, completion_ids):
        """Rewards (n, num_funcs) of this rank's completions, and their ExecutionOutcomes when a reward function
        exposes them as `last_outcomes` (spark_trl.reward.ExecutionReward does)."""
        with _local_rewards():
            rewards = self._calculate_rewards(rows, prompts, completions, completion_ids)
        outcomes: list[ExecutionOutcome | None] = [None] * len(prompts)
        for func in self.reward_funcs:
            last = getattr(func, "last_outcomes", None)
            if last is not None and len(last) == len(prompts):
                outcomes = list(last)
                break
        return rewards, outcomes

    def _generate_and_score_completions(self, inputs):
        # Replaces GRPOTrainer._generate_and_score_completions in training (evaluation keeps TRL's): adaptive
        # groups, advantages over each final group, reference/old log-probs for the sequences in the loss only,
        # and rows balanced across ranks and micro-steps.
        if not (self._spark_path and self.model.training):
            return super()._generate_and_score_completions(inputs)
        args = self.args
        device = self.accelerator.device
        if "image" in inputs[0] or "images" in inputs[0]:
            raise ValueError("SparkGRPOTrainer does not support image inputs")
        k0 = args.min_generations
        groups = [inputs[i] for i in range(0, len(inputs), k0)]  # one row per group: TRL repeats each k0 times
        for g, row in enumerate(groups):
            if any(inputs[g * k0 + j]["prompt"] != row["prompt"] for j in range(k0)):
                raise RuntimeError("a generation batch must hold whole groups of min_generations identical prompts")

        # Samples, in generation order; group_of[i] is the group of sample i.
        rows, prompts, prompt_ids, completion_ids, completions, group_of, outcomes = [], [], [], [], [], [], []
        reward_chunks = []

        # top_up_mode="prefetch": the first round samples max_generations per prompt at once and top-ups are
        # revealed from the spares (same distribution as sampling them later: the samples are i.i.d.).
        prefetch = args.top_up_mode == "prefetch" and args.adaptive
        spares: dict[int, list[tuple]] = defaultdict(list)
        generated_tokens = [0]

        def run_round(group_indices: list[int], per_prompt: int, first: bool = False):
            if prefetch and not first:
                taken = [spares[g].pop(0) for g in group_indices for _ in range(per_prompt)]
                p_ids = [t[0] for t in taken]
                c_ids = [t[1] for t in taken]
                comps = [t[2] for t in taken]
                round_prompts = [groups[g]["prompt"] for g in group_indices for _ in range(per_prompt)]
            else:
                # Every rank calls the backend with the same number of prompts (collective backends need it);
                # ranks with fewer groups to grow pad with copies of their first group and throw those away.
                n_global = self._reduce_max(len(group_indices)) if self.accelerator.num_processes > 1 else len(
                    group_indices)
                if n_global == 0:
                    return
                padded = group_indices + [0] * (n_global - len(group_indices))
                sampled = args.max_generations if (prefetch and first) else per_prompt
                all_prompts = [groups[g]["prompt"] for g in padded for _ in range(sampled)]
                p_all, c_all, comp_all = self._generate_round(all_prompts, sampled)
                generated_tokens[0] += sum(len(c) for c in c_all[:len(group_indices) * sampled])
                p_ids, c_ids, comps, round_prompts = [], [], [], []
                for k, g in enumerate(group_indices):
                    for j in range(sampled):
                        item = (p_all[k * sampled + j], c_all[k * sampled + j], comp_all[k * sampled + j])
                        if j < per_prompt:
                            p_ids.append(item[0])
                            c_ids.append(item[1])
                            comps.append(item[2])
                            round_prompts.append(all_prompts[k * sampled + j])
                        else:
                            spares[g].append(item)
            round_rows = [groups[g] for g in group_indices for _ in range(per_prompt)]
            if round_rows:
                r, o = self._score(round_rows, round_prompts, comps, c_ids)
                reward_chunks.append(r)
                outcomes.extend(o)
            rows.extend(round_rows)
            prompts.extend(round_prompts)
            prompt_ids.extend(p_ids)
            completion_ids.extend(c_ids)
            completions.extend(comps)
            group_of.extend(g for g in group_indices for _ in range(per_prompt))

        run_round(list(range(len(groups))), k0, first=True)
        size = [k0] * len(groups)
        weights = self.reward_weights.to(device)

        def group_stats():
            rewards_per_func = torch.cat(reward_chunks) if reward_chunks else torch.zeros(0, len(self.reward_funcs))
            unscorable = torch.isnan(rewards_per_func).all(dim=1)
            rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
            rewards[unscorable] = torch.nan
            gof = torch.tensor(group_of, dtype=torch.long, device=device)
            return rewards_per_func, rewards, gof

        while True:
            _, rewards, gof = group_stats()
            needy = [g for g in range(len(groups)) if size[g] < args.max_generations
                     and _group_std(rewards[gof == g], "population") <= args.adaptive_std_threshold]
            step = [min(args.generation_increment, args.max_generations - size[g]) for g in needy]
            # Groups grow by the same increment per round; one capped by max_generations grows by less.
            by_increment = defaultdict(list)
            for g, s in zip(needy, step):
                by_increment[s].append(g)
            # Every rank must run the same rounds: agree on the set of increments used this round.
            increments = sorted(by_increment)
            if self.accelerator.num_processes > 1:
                increments = sorted({s for lst in gather_object([increments]) for s in lst})
            if not increments:
                break
            for inc in increments:
                run_round(by_increment.get(inc, []), inc)
                for g in by_increment.get(inc, []):
                    size[g] += inc

        rewards_per_func, rewards, gof = group_stats()
        n = len(rows)
        advantages, no_variance_t = group_advantages(
            rewards, gof, std=args.advantage_std, epsilon=args.advantage_epsilon,
            threshold=args.adaptive_std_threshold, scale=args.scale_rewards == "group")
        no_variance = no_variance_t.tolist()
        if args.skip_zero_advantage == "none":
            keep = torch.ones(n, dtype=torch.bool, device=device)
        elif args.skip_zero_advantage == "group":
            keep = ~no_variance_t.to(device)[gof]
        else:
            keep = advantages.abs() >= args.advantage_epsilon

        # ---- statistics (global) and logging
        lengths = [len(c) for c in completion_ids]
        saved = 0.0
        for g in range(len(groups) if not prefetch else 0):  # prefetch generates max_generations anyway
            glen = [lengths[i] for i in range(n) if group_of[i] == g]
            saved += (args.max_generations - size[g]) * (sum(glen) / max(len(glen), 1))
        finite = ~torch.isnan(rewards)
        eos_and_pad = set(self.eos_token_ids) | {self._tokenizer.pad_token_id}
        truncated = sum(1 for c in completion_ids if not c or c[-1] not in eos_and_pad)
        with_outcome = [o for o in outcomes if o is not None]
        local = [
            len(groups), sum(size), sum(s > k0 for s in size), sum(no_variance), n, sum(lengths), saved,
            int(keep.sum()), sum(o.all_passed for o in with_outcome), len(with_outcome),
            float(rewards[finite].sum()), int(finite.sum()), float((rewards[finite] ** 2).sum()), truncated,
            sum(len(p) for p in prompt_ids), generated_tokens[0],
        ]
        (n_groups, size_sum, topped, constant, n_all, tokens, saved, kept, passed, judged, r_sum, r_cnt, r_sq,
         truncated, prompt_tokens, generated) = self._reduce_sum(local)
        hist = Counter(size)
        if self.accelerator.num_processes > 1:
            hist = Counter()
            for h in gather_object([dict(Counter(size))]):
                hist.update(h)
        st = self._stats
        st.rollouts += int(n_all)
        st.rollouts_with_outcome += int(judged)
        st.rollouts_passed += int(passed)
        st.completion_tokens += int(tokens)
        st.reward_sum += r_sum
        st.reward_count += int(r_cnt)
        st.groups += int(n_groups)
        st.groups_topped_up += int(topped)
        st.groups_without_variance += int(constant)
        st.group_sizes.update(hist)
        st.sequences_in_loss += int(kept)
        st.tokens_saved += saved
        m = self._metrics["train"]
        m["spark/group_size_mean"].append(size_sum / max(n_groups, 1))
        m["spark/frac_groups_topped_up"].append(topped / max(n_groups, 1))
        m["spark/frac_groups_without_variance"].append(constant / max(n_groups, 1))
        m["spark/completions"].append(n_all)
        m["spark/completion_tokens"].append(tokens)
        m["spark/generated_tokens"].append(generated)  # with prefetch, includes the spares never used
        m["spark/tokens_saved_vs_max_generations"].append(saved)
        m["spark/frac_sequences_in_loss"].append(kept / max(n_all, 1))
        if judged:
            m["spark/train_pass_rate"].append(passed / judged)
        mean_r = r_sum / max(r_cnt, 1)
        m["reward"].append(mean_r)
        m["reward_std"].append(math.sqrt(max(r_sq / max(r_cnt, 1) - mean_r ** 2, 0.0) * r_cnt / max(r_cnt - 1, 1)))
        m["frac_reward_zero_std"].append(constant / max(n_groups, 1))
        m["completions/mean_length"].append(tokens / max(n_all, 1))
        m["completions/clipped_ratio"].append(truncated / max(n_all, 1))
        for i, name in enumerate(self.reward_func_names):
            col = rewards_per_func[:, i]
            ok = ~torch.isnan(col)
            s, c = self._reduce_sum([float(col[ok].sum()), int(ok.sum())])
            m[f"rewards/{name}/mean"].append(s / c if c else float("nan"))
        self.state.num_input_tokens_seen += int(prompt_tokens + tokens)
        m["num_tokens"] = [self.state.num_input_tokens_seen]
        self._flush_reward_logs()
        if self.log_completions:
            self._logs["prompt"].extend(gather_object(prompts))
            self._logs["completion"].extend(gather_object(completions))
            for i, name in enumerate(self.reward_func_names):
                self._logs["rewards"][name].extend(gather_object(rewards_per_func[:, i].tolist()))
            self._logs["advantages"].extend(gather_object(advantages.tolist()))

        # ---- rollouts for the auxiliary objective
        if self._aux_on:
            new = []
            for i in range(n):
                new.append(Rollout(
                    prompt=prompts[i], completion=_text(completions[i]), reward=float(rewards[i]),
                    advantage=float(advantages[i]), group=self._group_counter + group_of[i], outcome=outcomes[i],
                    row={k: v for k, v in rows[i].items() if k != "prompt"},
                ))
            self._group_counter += len(groups)
            if args.aux_mode == "phase":
                self._epoch_rollouts.extend(new)
            else:
                self._prepare_joint_aux(new)

        # ---- tensors for the sequences in the loss, balanced over ranks and micro-steps
        kept_idx = keep.nonzero(as_tuple=True)[0].tolist()
        random.Random(int(torch.randint(0, 2**31 - 1, (1,)).item())).shuffle(kept_idx)  # TRL shuffles too
        spg = args.steps_per_generation
        per_step = max(1, math.ceil(self._reduce_max(len(kept_idx)) / spg))
        # Row j of the batch shows sample src[j]; real[j] is False for padding rows, which copy a kept sample of
        # this rank (or a one-token dummy, src None, when it has none) and carry no weight and no loss token.
        src: list[int | None] = []
        real: list[bool] = []
        for j in range(spg):
            chunk = kept_idx[j::spg]
            fill = per_step - len(chunk)
            src.extend(chunk + [kept_idx[(j + f) % len(kept_idx)] if kept_idx else None for f in range(fill)])
            real.extend([True] * len(chunk) + [False] * fill)
        batch = self._build_tensors(src, real, prompt_ids, completion_ids)
        batch["advantages"] = torch.tensor(
            [float(advantages[i]) if r else 0.0 for i, r in zip(src, real)], device=device)
        batch["seq_weight"] = torch.tensor([1.0 if r else 0.0 for r in real], device=device)
        loss_mask = batch["completion_mask"] * batch["tool_mask"]
        batch["num_items_in_batch"] = torch.tensor(self._reduce_sum([float(loss_mask.sum())])[0], device=device)
        batch["num_sequences"] = torch.tensor(float(kept), device=device)
        local_rows = [sum(real[j * per_step:(j + 1) * per_step]) for j in range(spg)]
        if self._aux_on and args.aux_mode == "joint":  # an auxiliary batch is something in the loss too
            local_rows = [n + len(b) for n, b in zip(local_rows, self._joint_aux_batches)]
        self._micro_step_rows = [int(x) for x in self._reduce_sum(local_rows)]
        if kept or sum(self._micro_step_rows) or self._step_had_backward:  # else no rank runs a forward
            self._add_logps(batch, src, real)
        self._rollout_global_step = self.state.global_step
        return batch

    def _flush_reward_logs(self):
        # Reward functions may log metrics (TRL's `log_metric`); average them over all ranks, as TRL does.
        names = sorted(set(self._pending_metrics)) if self.accelerator.num_processes == 1 else sorted(
            {k for lst in gather_object([list(self._pending_metrics)]) for k in lst})
        for name in names:
            values = self._pending_metrics.get(name, [])
            total, count = self._reduce_sum([sum(values), len(values)])
            if count:
                self._metrics["train"][name].append(total / count)
        self._pending_metrics.clear()
        self._pending_extra_logs.clear()

    def _build_tensors(self, src, real, prompt_ids, completion_ids):
        """Padded tensors as TRL's loss expects them. A padding row is an exact copy of its source row (so every
        log-prob computed on it is finite and equal to the source's) and is kept out of the loss by `tool_mask`,
        which TRL's `_compute_loss` multiplies into its loss mask (and `_spark_loss` too)."""
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        p = [torch.tensor(prompt_ids[i] if i is not None else [pad_id]) for i in src]
        c = [torch.tensor((completion_ids[i] or [pad_id]) if i is not None else [pad_id]) for i in src]
        ptm = self.pad_to_multiple_of
        prompt_ids_t = pad(p, padding_value=pad_id, padding_side="left", pad_to_multiple_of=ptm).to(device)
        prompt_mask = pad([torch.ones_like(x) for x in p], padding_value=0, padding_side="left",
                          pad_to_multiple_of=ptm).to(device)
        completion_ids_t = pad(c, padding_value=pad_id, padding_side="right", pad_to_multiple_of=ptm).to(device)
        completion_mask = pad([torch.ones_like(x) for x in c], padding_value=0, padding_side="right",
                              pad_to_multiple_of=ptm).to(device)
        eos_and_pad = set(self.eos_token_ids) | {pad_id}
        attend = []  # TRL's completion_mask: empty completions and (optionally) truncated ones are masked
        for i in src:
            ok = i is None or len(completion_ids[i]) > 0
            if ok and i is not None and self.mask_truncated_completions:
                ok = completion_ids[i][-1] in eos_and_pad
            attend.append(ok)
        completion_mask = completion_mask * torch.tensor(attend, device=device).unsqueeze(1).long()
        tool_mask = torch.tensor(real, device=device).unsqueeze(1).long().expand_as(completion_mask).contiguous()
        return {"prompt_ids": prompt_ids_t, "prompt_mask": prompt_mask, "completion_ids": completion_ids_t,
                "completion_mask": completion_mask, "tool_mask": tool_mask}

    @torch.no_grad()
    def _add_logps(self, batch, src, real):
        """Reference log-probs (beta != 0) and old log-probs (when a rollout outlives an optimizer step), computed
        once per rollout, for the sequences in the loss only; padding rows copy those of the row they repeat."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        need_old = self.args.gradient_accumulation_steps % generate_every != 0
        if self.beta == 0.0 and not need_old:
            return
        device = self.accelerator.device
        # One forward row per distinct sample (the real rows, or the dummy row of a rank without any).
        first: dict = {}
        for j, (i, r) in enumerate(zip(src, real)):
            if r or i is None:
                first.setdefault(i, j)
        rows = torch.tensor(sorted(first.values()), dtype=torch.long, device=device)
        position = torch.empty(len(src), dtype=torch.long, device=device)
        position[rows] = torch.arange(len(rows), device=device)
        take = position[torch.tensor([first[i] for i in src], dtype=torch.long, device=device)]
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)[rows]
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)[rows]
        logits_to_keep = batch["completion_ids"].size(1)
        bs = self.args.per_device_train_batch_size

        def forward(model):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=bs)
            return logps.float()[take]

        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if need_old:
                # Same train-mode forward as the loss's; only used after the policy has changed (see _compute_loss).
                batch["old_per_token_logps"] = forward(self.model)
            if self.beta != 0.0:
                self.ref_forward_calls += 1
                # Summed over ranks like every SparkStats figure (each rank has its own rows); all ranks reach
                # this collective, as beta is the same everywhere.
                self._stats.ref_forward_sequences += int(self._reduce_sum([sum(real)])[0])
                if self.ref_model is not None:
                    batch["ref_per_token_logps"] = forward(self.ref_model)
                else:
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    name = "ref" if "ref" in getattr(unwrapped, "peft_config", {}) else None
                    with use_adapter(unwrapped, adapter_name=name):
                        batch["ref_per_token_logps"] = forward(self.model)

    # ------------------------------------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs):
        # Wraps GRPOTrainer._compute_loss in training: old log-probs are the current ones (ratio exactly 1) until
        # the policy changes, and the loss is normalised by the generation batch's global sequence/token count so
        # that padding rows and uneven ranks change nothing.
        if not (self._spark_path and self.model.training and "seq_weight" in inputs):
            if self.loss_type == "spark":  # evaluation batches come from TRL's path: a plain mean over sequences
                return self._spark_eval_loss(model, inputs)
            return super()._compute_loss(model, inputs)
        if self.state.global_step == self._rollout_global_step:
            inputs = {k: v for k, v in inputs.items() if k != "old_per_token_logps"}
        if self.loss_type == "spark":
            loss = self._spark_loss(model, inputs)
        else:
            n_kl = len(self._metrics["train"]["kl"])
            loss = super()._compute_loss(model, inputs)
            if self.loss_type in ("grpo", "sapo", "luspo", "dr_grpo"):
                # TRL averages over the B rows of the micro-batch; re-weight to the global sequence count.
                scale = (inputs["prompt_ids"].size(0) * self.accelerator.num_processes * self.args.steps_per_generation
                         / inputs["num_sequences"].clamp(min=1.0))
                loss = loss * scale
            if self.beta != 0.0 and len(self._metrics["train"]["kl"]) > n_kl:
                tokens = self._reduce_sum([float((inputs["completion_mask"] * inputs["tool_mask"]).sum())])[0]
                self._stats.kl_sum += self._metrics["train"]["kl"][-1] * tokens
                self._stats.kl_tokens += int(tokens)
        if self._aux_on and self.args.aux_mode == "joint":
            loss = loss + self._joint_aux_loss(model)
        return loss

    def _spark_eval_loss(self, model, inputs):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, inputs["completion_ids"].size(1))
        per_seq, _, _ = spark_policy_loss(
            logps, logps.detach(), inputs.get("ref_per_token_logps"), inputs["advantages"],
            inputs["completion_mask"], self.epsilon_low, self.epsilon_high, self.beta)
        return per_seq.mean()

    def _spark_loss(self, model, inputs):
        """`loss_type="spark"`: see `spark_policy_loss`; normalised over the N sequences of the optimizer step."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logps, _, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask, completion_ids.size(1))
        old = inputs.get("old_per_token_logps")
        mask = completion_mask * inputs["tool_mask"]
        per_seq, ratio, kl = spark_policy_loss(
            logps, logps.detach() if old is None else old, inputs.get("ref_per_token_logps"), inputs["advantages"],
            mask, self.epsilon_low, self.epsilon_high, self.beta)
        # DDP averages gradients over ranks, hence num_processes; the generation batch spans steps_per_generation
        # micro-steps of which an optimizer step takes gradient_accumulation_steps.
        norm = (self.accelerator.num_processes * self.args.steps_per_generation
                / (self.current_gradient_accumulation_steps * inputs["num_sequences"].clamp(min=1.0)))
        loss = (per_seq * inputs["seq_weight"]).sum() * norm

        # Metrics, global over ranks; padding rows are masked out.
        maskf = mask.float()
        adv = inputs["advantages"].unsqueeze(1)
        ratio = ratio.detach()
        low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).float()
        stats = [float((ratio * maskf).sum()), float(maskf.sum()), float((low * maskf).sum()),
                 float((high * maskf).sum())]
        if kl is not None:
            kl_token_sum, _, kl_seq_sum, kl_seqs = kl_sums(kl.detach(), maskf, inputs["seq_weight"])
            stats += [kl_token_sum, kl_seq_sum, kl_seqs]
        red = self._reduce_sum(stats)
        tok = max(red[1], 1.0)
        m = self._metrics["train"]
        m["ratio_mean"].append(red[0] / tok)
        m["clip_ratio/low_mean"].append(red[2] / tok)
        m["clip_ratio/high_mean"].append(red[3] / tok)
        m["clip_ratio/region_mean"].append((red[2] + red[3]) / tok)
        if kl is not None:
            m["kl"].append(red[4] / tok)
            if red[6]:
                m["kl/sequence_mean"].append(red[5] / red[6])  # the reference card's "GRPO KL"
            self._stats.kl_sum += red[4]
            self._stats.kl_tokens += int(red[1])
            self._stats.kl_seq_sum += red[5]
            self._stats.kl_seqs += int(red[6])
        return loss

    # ------------------------------------------------------------------------------------------------ auxiliary

    def _prepare_joint_aux(self, rollouts: list[Rollout]):
        examples = [e for e in self.aux_objective.build(rollouts) if e.weight > 0]
        self._count_aux_examples(examples)
        random.Random(self.args.seed + self._group_counter).shuffle(examples)
        spg = self.args.steps_per_generation
        self._joint_aux_batches = [examples[j::spg] for j in range(spg)]

    def _count_aux_examples(self, examples):
        counts = Counter(e.kind for e in examples)
        kinds = sorted(set(counts) | {"pointwise", "pairwise", "reflection"})
        if self.accelerator.num_processes > 1:
            kinds = sorted({k for lst in gather_object([kinds]) for k in lst})
        for kind, total in zip(kinds, self._reduce_sum([counts.get(k, 0) for k in kinds])):
            if total:
                self._stats.aux_examples[kind] += int(total)

    def _joint_aux_loss(self, model):
        batch = self._joint_aux_batches[self._step % self.args.steps_per_generation] if self._joint_aux_batches else []
        aux = 0.0
        if batch:
            # The unwrapped model: a second forward through the DDP wrapper before one backward is not allowed;
            # the gradients still reach the shared parameters and are reduced with the GRPO loss's.
            aux = self.aux_objective.loss(self.accelerator.unwrap_model(model), batch)
        # Every rank gets here once per micro-step: the figures are averaged over the ranks that had a batch.
        total, count = self._reduce_sum([float(aux.detach()) if batch else 0.0, 1.0 if batch else 0.0])
        if count:
            self._stats.aux_loss_sum += total / count
            self._stats.aux_steps += 1
            self._metrics["train"]["aux/loss"].append(total / count)
        if not batch:
            return 0.0
        # DDP averages gradients over all ranks; rescale so that the result is the mean over the ranks that had
        # a batch (a rank without one would otherwise halve the weight of the others' examples).
        rescale = self.accelerator.num_processes / count
        return self.args.aux_loss_scale * rescale * aux / self.current_gradient_accumulation_steps

    def _run_aux_phase(self):
        """One auxiliary epoch over this epoch's rollouts (the study's Condition C), with the trainer's optimizer.

        Every rank runs the same number of optimizer steps: ranks with fewer examples pad with weight-0 batches,
        whose zero loss still joins the gradient all-reduce. No step is taken when no rank has an example.
        """
        objective = self.aux_objective
        examples = [e for e in objective.build(self._epoch_rollouts) if e.weight > 0]
        self._epoch_rollouts = []
        self._count_aux_examples(examples)
        random.Random(self.args.seed + int(self.state.epoch or 0)).shuffle(examples)
        bs = self.args.aux_batch_size
        batches = [examples[i:i + bs] for i in range(0, len(examples), bs)]
        n_steps = self._reduce_max(len(batches))
        if n_steps == 0:
            return
        model = self.model_wrapped
        model.train()
        optimizer = self.optimizer
        scale = self.args.aux_loss_scale
        loss_sum, steps = 0.0, 0
        for step in range(n_steps):
            if step < len(batches):
                batch, weight = batches[step], 1.0
            else:
                batch, weight = [examples[0] if examples else objective.dummy_example()], 0.0
            # DDP averages gradients over all ranks: make the step the mean over the ranks with a real batch,
            # not a mean diluted by the weight-0 padding batches of ranks that ran out of examples.
            if self.accelerator.num_processes > 1:
                (real,) = self._reduce_sum([weight])
                weight *= self.accelerator.num_processes / max(real, 1.0)
            with self.accelerator.autocast():
                aux = objective.loss(model, batch)
            self.accelerator.backward(aux * scale * weight)
            if self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            if weight:
                loss_sum += float(aux.detach())
                steps += 1
        # Global figures: the mean over every rank's real batches, and the number of optimizer steps taken.
        loss_sum, steps = self._reduce_sum([loss_sum, steps])
        self._stats.aux_loss_sum += loss_sum * n_steps / max(steps, 1)
        self._stats.aux_steps += n_steps


def spark_policy_loss(logps, old_logps, ref_logps, advantages, mask, epsilon_low=0.2, epsilon_high=0.2, beta=0.0):
    r"""The study's per-sequence loss (PPO-clip surrogate plus the k3 KL estimator), as in the GRPO paper:

        r_t   = exp(logp_t - logp_old_t)
        k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
        L_i   = 1/|o_i| sum_t [ -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t ]

    The KL is the plain k3 estimator: no importance-ratio correction (TRL's `use_bias_correction_kl`).
    Returns (L_i of shape (B,), r of shape (B, T), k3 of shape (B, T) or None when beta == 0).

    Example:
    ```python
    >>> logps = torch.log(torch.tensor([[0.5, 0.25]]))
    >>> loss, ratio, kl = spark_policy_loss(logps, logps, None, torch.tensor([1.0]), torch.ones(1, 2))
    >>> float(loss[0]), float(ratio.mean())
    (-1.0, 1.0)
    ```
    """
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    maskf = mask.to(per_token.dtype)
    per_seq = (per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)
    return per_seq, ratio, kl


def kl_sums(kl: torch.Tensor, mask: torch.Tensor, seq_weight: torch.Tensor) -> list[float]:
    """Sums for the two averages of a per-token KL (B, T) over the sequences in the loss (seq_weight 1):

        token-weighted  = sum_i sum_t kl_it / sum_i |o_i|                        (TRL's logged "kl")
        sequence mean   = 1/N sum_i (1/|o_i| sum_t kl_it)                      (the reference card's "GRPO KL")

    Returns [sum of kl over tokens, tokens, sum of the sequences' token means, sequences N]; sums, so that ranks
    and micro-steps can be added before dividing.

    Example:
    ```python
    >>> kl_sums(torch.tensor([[0.1, 0.3], [0.5, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.ones(2))
    [0.9, 3.0, 0.7, 2.0]
    ```
    """
    mask = mask.float()
    in_loss = (mask.sum(-1) > 0).float() * seq_weight.float()
    mask = mask * in_loss.unsqueeze(1)
    per_seq = (kl.float() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return [round(float(x), 12) for x in ((kl.float() * mask).sum(), mask.sum(), per_seq.sum(), in_loss.sum())]


def group_advantages(rewards: torch.Tensor, group_of: torch.Tensor, std: str = "population", epsilon: float = 1e-8,
                     threshold: float = 1e-8, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages z-scored within each group (groups may differ in size), and which groups have no variance.

    A group whose finite rewards have population std <= `threshold` gets zero advantages; NaN rewards (no reward
    function scored the completion) get zero and are left out of the group's mean and std.

    Example:
    ```python
    >>> adv, flat = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0]), torch.tensor([0, 0, 0, 0, 1, 1]))
    >>> [round(a, 4) for a in adv.tolist()], flat.tolist()
    ([1.0, -1.0, 1.0, -1.0, 0.0, 0.0], [False, True])
    ```
    """
    n_groups = int(group_of.max()) + 1 if group_of.numel() else 0
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    no_variance = torch.zeros(n_groups, dtype=torch.bool)
    for g in range(n_groups):
        idx = (group_of == g).nonzero(as_tuple=True)[0]
        r = rewards[idx].float()
        no_variance[g] = _group_std(r, "population") <= threshold
        if no_variance[g]:
            continue
        adv = r - torch.nanmean(r)
        if scale:
            adv = adv / (_group_std(r, std) + epsilon)
        advantages[idx] = torch.nan_to_num(adv, nan=0.0)
    return advantages, no_variance


def _required_columns(reward_func) -> tuple[str, ...]:
    """Dataset columns a reward function declares it reads (`required_columns`, as ExecutionReward does)."""
    return tuple(getattr(reward_func, "required_columns", None) or ())


def _group_std(r: torch.Tensor, kind: str) -> float:
    """Std of a group's finite rewards: population (divide by n) or sample (n - 1); 0 with fewer than 2."""
    r = r[~torch.isnan(r)]
    if r.numel() < 2:
        return 0.0
    return float(r.double().std(correction=0 if kind == "population" else 1))


def _text(completion) -> str:
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion
