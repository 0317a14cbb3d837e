"""`SparkGRPOTrainer`: TRL's `GRPOTrainer` with adaptive group sizes, the study's loss and optimisation schedule, and
an auxiliary-recycling hook.

How a training micro-step runs, top to bottom (each override names the TRL method it replaces):

1. `training_step` takes the micro-batch from `_prepare_inputs`; a micro-step with nothing in the loss on any rank
   runs no forward and no backward, so an optimizer step without a gradient moves no weight.
2. `_prepare_inputs` serves the micro-batches of the current rollout and makes a new rollout when they are used up:
   `_generate_and_score_completions` over the generation batch.
3. `_generate_and_score_completions` = growing groups (`spark_trl.groups`), the math (`spark_trl.grpo_math`:
   advantages, which sequences enter the loss), the statistics (`spark_trl.stats`), the batch
   (`spark_trl.batching`: rows balanced over ranks and micro-steps, reference and old log-probs).
4. `_compute_loss`: the study's loss (`loss_type="spark"`) or TRL's, normalised over the sequences of the
   rollout, plus the auxiliary loss in joint mode. The auxiliary phase runs at the end of each epoch
   (`spark_trl.aux_training`; the objective's examples are `spark_trl.recycling`'s).

The arguments are checked before a model is loaded (`spark_trl.trainer_checks`). Private names of TRL are reached
only through `spark_trl.trl_private`.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from . import trl_private
from .aux_training import AuxiliaryTraining
from .batching import (build_tensors, deal_in_order, deal_round_robin, pad_layout, rows_per_micro_step,
                       sampler_logps_rows, split_micro_batches)
from .collectives import Ranks
from .configs import SparkGRPOConfig
from .groups import GroupGrower, GrownGroups, ReportsOutcomes, outcomes_of
from .grpo_math import (clip_sums, group_advantages, in_loss, kl_sums, sampler_importance_weights,
                        sampler_mismatch_sums, sampler_weight_figures, spark_policy_loss)
from .monitor import CollapseMonitor
from .recycling import AuxiliaryObjective, RecyclingObjective
from .sampling import CoveringRepeatSampler, epoch_order
from .stats import ExtraColumns, RolloutFigures, SparkStats, log_sampler_gap
from .trainer_checks import validate

__all__ = ["SparkGRPOTrainer", "SparkStats", "group_advantages", "kl_sums", "spark_policy_loss"]

logger = logging.getLogger(__name__)


@dataclass
class ScoredRollout:
    """Grown groups with their rewards, advantages and the sequences that enter the loss."""

    grown: GrownGroups
    rewards_per_func: torch.Tensor  # (n, reward functions)
    rewards: torch.Tensor  # (n,) weighted sum, NaN when unscored
    advantages: torch.Tensor  # (n,)
    no_variance: torch.Tensor  # (groups,) bool
    keep: torch.Tensor  # (n,) bool: in the loss
    extra_columns: dict[str, list]  # log_extra columns of the reward functions, one value per completion

    @staticmethod
    def concat(parts: list["ScoredRollout"]) -> "ScoredRollout":
        """Several rollouts as one (the chunks of an epoch's rollout): groups renumbered, columns joined."""
        grown = GrownGroups(rows=[])
        for p in parts:
            grown.extend(p.grown)
        extra = ExtraColumns()
        for p in parts:
            extra.add_round(p.extra_columns, len(p.grown))
        return ScoredRollout(grown, *(torch.cat([getattr(p, name) for p in parts]) for name in (
            "rewards_per_func", "rewards", "advantages", "no_variance", "keep")), extra.columns)


class _SparkCallback(TrainerCallback):
    """Epoch bookkeeping. Registered before the user's callbacks, so that their `on_epoch_end` (a study runner's
    evaluation and checkpoint) sees the model after the auxiliary phase and the epoch's complete statistics."""

    def __init__(self):
        self.trainer: SparkGRPOTrainer | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._begin_epoch()

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer._pass_done:  # rollout_schedule="epoch": the pass over the epoch's rollouts is over
            self.trainer._pass_done = False
            control.should_epoch_stop = True

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

    def __init__(self, model, reward_funcs=None, args: SparkGRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, tools=None, rollout_func=None,
                 environment_factory=None, aux_objective: AuxiliaryObjective | None = None):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = SparkGRPOConfig(f"{str(name).split('/')[-1]}-SparkGRPO")
        if not isinstance(args, SparkGRPOConfig):
            raise TypeError(f"args must be a SparkGRPOConfig, got {type(args).__name__}")
        # Everything checkable before a model is loaded is checked here (spark_trl.trainer_checks).
        trl_private.check()
        self._spark_path = not (tools or rollout_func or environment_factory)
        validate(args, reward_funcs, train_dataset, aux_objective, tools, rollout_func, environment_factory)

        self._spark_callback = _SparkCallback()
        # On by default: a reward that rises while the pass rate falls is the failure GRPO hides best.
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        mode = next((getattr(f, "mode", None) for f in funcs if isinstance(f, ReportsOutcomes)), None)
        self.collapse_monitor = CollapseMonitor(window=args.collapse_window or 0, reward_mode=mode)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         reward_processing_classes=reward_processing_classes,
                         callbacks=[self._spark_callback, self.collapse_monitor] + list(callbacks or []),
                         optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config, tools=tools,
                         rollout_func=rollout_func, environment_factory=environment_factory)
        self._spark_callback.trainer = self
        trl_private.check(self)

        # TRL adds a frozen "ref" copy of a pre-existing adapter; the study's reference is the base model.
        unwrapped = self.accelerator.unwrap_model(self.model)
        if args.ref_adapter == "disable" and is_peft_model(unwrapped) and "ref" in unwrapped.peft_config:
            unwrapped.delete_adapter("ref")
            unwrapped.set_adapter("default")

        if aux_objective is None and args.aux_objective == "recycling":
            aux_objective = RecyclingObjective.from_config(self.processing_class, args)
        self.aux_objective = aux_objective

        self._engine = None
        self._engine_synced_step = None
        # The sampler's importance-sampling correction (TRL's vllm_importance_sampling_*, for the fast engine).
        self._sampler_correction = bool(args.vllm_importance_sampling_correction)
        self._warned_no_sampler_logps = False
        if args.rollout_engine == "spark":
            from .rollout import FastRolloutEngine  # checked importable in trainer_checks.validate

            self._engine = FastRolloutEngine(unwrapped, self.processing_class, args)

        self._ranks = Ranks(self.accelerator)
        # Condition C: the auxiliary objective's rollouts and examples, trained on jointly or in a phase per epoch.
        self._aux = AuxiliaryTraining(aux_objective, args, self._ranks, self.accelerator, self.is_fsdp_enabled)
        self._grower = GroupGrower(
            self._generate_round, self._score, self._ranks, self.reward_weights, args.min_generations,
            args.max_generations, args.generation_increment, args.adaptive_std_threshold,
            prefetch=args.top_up_mode == "prefetch")
        self._stats = SparkStats()
        self.spark_stats_history: list[dict[str, Any]] = []
        self._micro_batches: list[dict] = []  # the current rollout, one dict per micro-step
        self._micro_step_rows: list[int] = []  # per micro-step: rows in the loss (and aux examples), all ranks
        self._n_micro = 0  # micro-steps of one pass over the current rollout
        self._micro_num_items: list | None = None
        self._position = 0  # the current micro-step's index in _micro_batches
        self._rollout_epoch = -1  # rollout_schedule="epoch": the epoch whose rollout _micro_batches holds
        self._epoch_index = 0
        self._steps_per_epoch = 0  # rollout_schedule="epoch": the Trainer's steps per epoch (an upper bound)
        self._pass_done = False  # the epoch's pass just ended: stop the epoch (read by _SparkCallback)
        self._pass_complete = False  # the current epoch's pass has ended (False after an interruption)
        self._rollout_global_step = -1  # optimizer step at which the current rollout was generated
        self._step_had_backward = False  # whether the optimizer step in progress has run a backward yet
        self.ref_forward_calls = 0  # reference forward passes (batches), for tests and benchmarks

    @property
    def rollout_engine(self):
        """The FastRolloutEngine sampling the rollouts (rollout_engine="spark"), or None. The study runner lends it
        to the evaluation (``FastRolloutEngine.sampling``) so that one dense copy of the weights serves both."""
        return self._engine

    # ------------------------------------------------------------------------------------------------ epochs

    @property
    def spark_stats(self) -> dict[str, Any]:
        """Figures of the current epoch (complete when a callback's `on_epoch_end` runs): train pass rate, mean KL,
        mean completion tokens, group sizes, ... Past epochs are in `spark_stats_history`."""
        return self._stats.summary()

    def reset_spark_stats(self) -> None:
        """Start accumulating `spark_stats` afresh (done automatically at the start of every epoch)."""
        self._stats = SparkStats()

    def epoch_state(self) -> dict[str, Any]:
        """This process's per-epoch accumulators (statistics, the rollouts the auxiliary phase will read): what a
        checkpoint taken in the middle of an epoch must hold for an exact resume. See `load_epoch_state`."""
        state = {"stats": self._stats, "epoch_rollouts": self._aux.epoch_rollouts}
        if self.args.rollout_schedule == "epoch" and self._rollout_epoch == self._epoch_index:
            # The epoch's rollout, which the rest of the pass trains on.
            state["pass"] = {"epoch": self._rollout_epoch, "rows": self._micro_step_rows,
                             "aux_rows": self._aux.rows, "aux_batches": self._aux.batches,
                             "rollout_global_step": self._rollout_global_step,
                             "micro_batches": [{k: v.cpu() if torch.is_tensor(v) else v for k, v in mb.items()}
                                               for mb in self._micro_batches]}
        return state

    def load_epoch_state(self, state: dict[str, Any]) -> None:
        """Restore what `epoch_state` returned (after `on_epoch_begin` of the resumed epoch has reset it)."""
        self._stats = state["stats"]
        self._aux.epoch_rollouts = state["epoch_rollouts"]
        saved = state.get("pass")
        if saved is not None:
            device = self.accelerator.device
            self._micro_batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.items()}
                                   for mb in saved["micro_batches"]]
            self._micro_step_rows = saved["rows"]
            self._aux.rows, self._aux.batches = saved["aux_rows"], saved["aux_batches"]
            self._rollout_epoch = saved["epoch"]
            self._rollout_global_step = saved["rollout_global_step"]

    def _begin_epoch(self):
        self.reset_spark_stats()
        self._aux.epoch_rollouts = []
        self._pass_complete = False
        if self._steps_per_epoch:
            self._epoch_index = self.state.global_step // self._steps_per_epoch

    def _end_epoch(self):
        if self.args.rollout_schedule == "epoch" and not self._pass_complete:
            return  # training stopped in the middle of the pass: the epoch is not over (a resume finishes it)
        if self._aux.phase:
            self._aux.run_phase(self.model_wrapped, self.model, self.optimizer, self._stats, self.state.epoch)
        if self.args.rollout_schedule == "epoch" and self._steps_per_epoch:
            # The epoch ended when its pass did, before the Trainer's (upper-bound) count of steps: move the step
            # counter to the epoch's end, so that resuming (which finds the epoch from global_step) and a runner's
            # per-epoch arithmetic stay right. The optimizer and the scheduler saw only the real steps.
            trl_private.move_global_step(self, (self._epoch_index + 1) * self._steps_per_epoch)
            self.state.epoch = float(self._epoch_index + 1)
        summary = self.spark_stats
        summary["epoch"] = self.state.epoch
        self.spark_stats_history.append(summary)
        self.log({f"spark/epoch/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})

    # ------------------------------------------------------------------------------------------------ the step

    def get_train_dataloader(self):
        # Replaces GRPOTrainer.get_train_dataloader for rollout_schedule="epoch": the trainer draws each epoch's
        # problems itself (sampling.epoch_order); the loader only counts micro-steps, as many per epoch as the
        # largest possible pass needs (every group at max_generations, all in the loss). The epoch stops when
        # its pass does (_SparkCallback.on_step_end).
        if not (self._spark_path and self.args.rollout_schedule == "epoch"):
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        from .sampling import EpochTicks

        args, world = self.args, self.accelerator.num_processes
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        problems = -(-len(self.train_dataset) // world)
        self._steps_per_epoch = -(-problems * args.max_generations // per_step) * self.num_iterations
        ticks = EpochTicks(self._steps_per_epoch * args.gradient_accumulation_steps, world)
        return self.accelerator.prepare(DataLoader(ticks, batch_size=1, collate_fn=list))

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
        empty = self._rows_in(self._position) == 0
        # A step whose earlier micro-steps ran a backward must still run its last one: the gradient all-reduce
        # (DDP) or reduce-scatter (FSDP) happens there. DeepSpeed counts backward calls to find its accumulation
        # boundary, so under DeepSpeed nothing is skipped.
        if empty and not (sync and self._step_had_backward) and not self.is_deepspeed_enabled:
            trl_private.count_micro_step(self)
            loss = torch.zeros((), device=self.accelerator.device)
        else:
            loss = super().training_step(model, batch, num_items_in_batch)
            self._step_had_backward = True
        if sync:
            if self._step_had_backward:
                self._stats.optimizer_steps += 1
            else:
                self._stats.optimizer_steps_skipped += 1
                trl_private.metrics(self)["spark/optimizer_step_skipped"].append(1.0)
            self._step_had_backward = False
            if self.args.rollout_schedule == "epoch" and self._position + 1 >= len(self._micro_batches):
                self._pass_done = self._pass_complete = True
        return loss

    def _rows_in(self, position: int) -> int:
        return self._micro_step_rows[position] if position < len(self._micro_step_rows) else 0

    def _prepare_inputs(self, generation_batch):
        # Replaces GRPOTrainer._prepare_inputs in training: serves the micro-batches of the current rollout, already
        # balanced over ranks (TRL's shuffle + split would drop the remainder rows of a batch whose size varies with
        # the top-ups), and makes a new rollout when the schedule says so.
        if not (self._spark_path and self.model.training):
            return super()._prepare_inputs(generation_batch)
        if isinstance(generation_batch, dict):  # a micro-batch that training_step has already prepared
            return generation_batch
        if self.args.rollout_schedule == "epoch":
            self._position = int(generation_batch[0])  # the micro-step's index in the epoch (EpochTicks)
            if self._rollout_epoch != self._epoch_index:
                if self._position > 0:
                    logger.warning("resuming in the middle of an epoch without its saved rollout: the rest of the "
                                   "epoch trains on a fresh rollout of the epoch's problems")
                self._new_rollout(self._epoch_rows())
                self._rollout_epoch = self._epoch_index
        else:
            step = trl_private.micro_step(self)
            self._position = step % self.args.steps_per_generation
            if step % (self.args.steps_per_generation * self.num_iterations) == 0 or not self._micro_batches:
                self._new_rollout(generation_batch)
        if self._position >= len(self._micro_batches):  # resumed after the end of the epoch's pass
            return _without_weight(self._micro_batches[-1])
        return self._micro_batches[self._position]

    def _new_rollout(self, inputs) -> None:
        batch = self._generate_and_score_completions(inputs)
        self._micro_batches = split_micro_batches(batch, self._n_micro)
        for micro, num_items in zip(self._micro_batches, self._micro_num_items or []):
            micro["num_items_in_batch"] = num_items
        if self.args.rollout_schedule == "epoch":  # num_iterations passes over the epoch's rollout
            self._micro_batches = self._micro_batches * self.num_iterations
            self._micro_step_rows = self._micro_step_rows * self.num_iterations
            self._aux.rows = self._aux.rows * self.num_iterations
            self._aux.batches = self._aux.batches * self.num_iterations

    def _epoch_rows(self) -> list[dict]:
        """This process's problems of the current epoch, each repeated min_generations times (TRL's format)."""
        ranks, dataset = self._ranks, self.train_dataset
        order = epoch_order(len(dataset), self._epoch_index, self.args.seed, self.shuffle_dataset)
        return [dataset[i] for i in order[ranks.rank::ranks.world] for _ in range(self.args.min_generations)]

    # ------------------------------------------------------------------------------------------------ rollouts

    def _generate_and_score_completions(self, inputs):
        # Replaces GRPOTrainer._generate_and_score_completions in training (evaluation keeps TRL's): adaptive
        # groups, advantages over each final group, and the batch of the sequences in the loss. `inputs` is a
        # generation batch, or with rollout_schedule="epoch" all of this process's problems of the epoch, sampled
        # in chunks of a generation batch with the same policy.
        if not (self._spark_path and self.model.training):
            return super()._generate_and_score_completions(inputs)
        if inputs and ("image" in inputs[0] or "images" in inputs[0]):
            raise ValueError("SparkGRPOTrainer does not support image inputs")
        rows = _group_rows(inputs, self.args.min_generations)
        if self.args.rollout_schedule == "epoch":
            chunk = self.args.per_device_train_batch_size * self.args.steps_per_generation // self.args.min_generations
            n_chunks = self._ranks.max(-(-len(rows) // chunk))  # every rank joins every chunk's generation rounds
            filler = self.train_dataset[0]
            scored = ScoredRollout.concat([self._sample_and_score(rows[c * chunk:(c + 1) * chunk], filler)
                                           for c in range(n_chunks)])
        else:
            scored = self._sample_and_score(rows)
        self._record(scored)
        return self._assemble(scored)

    def _sample_and_score(self, rows: list[dict], filler: dict | None = None) -> ScoredRollout:
        """Growing groups, then the math: rewards, advantages within each final group, what enters the loss."""
        args = self.args
        self._extra_columns = ExtraColumns()
        grown = self._grower.grow(rows, filler)
        device = self.accelerator.device
        rewards_per_func = grown.rewards_per_func(len(self.reward_funcs)).to(device)
        rewards = grown.rewards(self.reward_weights.to(device))
        group_of = torch.tensor(grown.group_of, dtype=torch.long, device=device)
        advantages, no_variance = group_advantages(
            rewards, group_of, std=args.advantage_std, epsilon=args.advantage_epsilon,
            threshold=args.adaptive_std_threshold, scale=args.scale_rewards == "group")
        keep = in_loss(advantages, no_variance, group_of, args.skip_zero_advantage, args.advantage_epsilon)
        return ScoredRollout(grown, rewards_per_func, rewards, advantages, no_variance, keep,
                             self._extra_columns.columns)

    def _generate_round(self, prompts: list, per_prompt: int) -> tuple[list, list, list, list | None]:
        """One call of the generation backend: `prompts` holds each prompt `per_prompt` times in a row. Returns
        prompt ids, completion ids, completions and the sampler's per-token log-probs (the fast engine's
        `last_logprobs`; None from TRL's backends and from the engine's `model.generate` fallback)."""
        prompt_ids = trl_private.tokenize_prompts(self, prompts)
        sampler_logps = None
        if self._engine is not None:
            if self._engine_synced_step != self.state.global_step:
                self._engine.sync_weights(self.accelerator.unwrap_model(self.model))
                self._engine_synced_step = self.state.global_step
            completion_ids = [list(c) for c in self._engine.generate(prompt_ids)]
            if len(completion_ids) != len(prompt_ids):
                raise RuntimeError(
                    f"FastRolloutEngine.generate returned {len(completion_ids)} completions for {len(prompt_ids)} "
                    "prompts; it must return one per prompt")
            sampler_logps = self._engine.last_logprobs
            if sampler_logps is not None and [len(x) for x in sampler_logps] != [len(c) for c in completion_ids]:
                raise RuntimeError("FastRolloutEngine.last_logprobs does not line up with the completions it "
                                   "returned: one log-prob per completion token is needed")
            if sampler_logps is None and self._sampler_correction and not self._warned_no_sampler_logps:
                self._warned_no_sampler_logps = True
                logger.warning("the fast engine gave no sampler log-probs (it fell back to model.generate, which "
                               "samples from the training model itself): those completions get importance weight 1")
        else:
            # TRL's backend: transformers generate, continuous batching, or vLLM (whose server mode de-duplicates
            # prompts by taking every `per_prompt`-th one, hence the contiguous repeats).
            completion_ids = trl_private.generate(self, prompt_ids, per_prompt)
        contents = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": c}] for c in contents]
        else:
            completions = contents
        return prompt_ids, completion_ids, completions, sampler_logps

    def _score(self, rows, prompts, completions, completion_ids):
        """Rewards (n, reward functions) of this rank's completions and their outcomes (from a reward function
        that declares `ReportsOutcomes`); the reward functions' `log_extra` values join the rollout's columns."""
        rewards = trl_private.calculate_rewards(self, rows, prompts, completions, completion_ids)
        self._extra_columns.add_round(trl_private.take_reward_extra(self), len(prompts))
        return rewards, outcomes_of(self.reward_funcs, len(prompts))

    # ------------------------------------------------------------------------------------------------ statistics

    def _record(self, scored: ScoredRollout) -> None:
        """Statistics (global over ranks, one reduction), TRL's logs, and the rollouts for the auxiliary
        objective."""
        figures = self._figures(scored).reduced(self._ranks)
        figures.add_to(self._stats)
        figures.log(trl_private.metrics(self), self.reward_func_names)
        self.state.num_input_tokens_seen += figures.prompt_tokens + figures.completion_tokens
        trl_private.metrics(self)["num_tokens"] = [self.state.num_input_tokens_seen]
        self._flush_reward_logs(scored)
        if self._aux.on:
            self._aux.collect(scored)

    def _figures(self, scored: ScoredRollout) -> RolloutFigures:
        """This rank's figures of the rollout."""
        args, grown = self.args, scored.grown
        lengths = [len(c) for c in grown.completion_ids]
        saved = 0.0
        if args.top_up_mode != "prefetch":  # prefetch samples max_generations anyway
            for g, size in enumerate(grown.sizes):
                glen = [n for n, gi in zip(lengths, grown.group_of) if gi == g]
                saved += (args.max_generations - size) * (sum(glen) / max(len(glen), 1))
        rewards = scored.rewards
        finite = ~torch.isnan(rewards)
        eos_and_pad = set(self.eos_token_ids) | {self._pad_id()}
        judged = [o for o in grown.outcomes if o is not None]
        per_func = []
        for i in range(scored.rewards_per_func.size(1)):
            col = scored.rewards_per_func[:, i]
            ok = ~torch.isnan(col)
            per_func.append([float(col[ok].sum()), int(ok.sum())])
        return RolloutFigures(
            groups=len(grown.rows), completions=len(grown), topped_up=sum(s > args.min_generations for s in grown.sizes),
            without_variance=int(scored.no_variance.sum()), completion_tokens=sum(lengths),
            generated_tokens=grown.generated_tokens, tokens_saved=saved, in_loss=int(scored.keep.sum()),
            passed=sum(o.all_passed for o in judged), judged=len(judged),
            no_attempt=sum(o.no_attempt for o in judged), reward_sum=float(rewards[finite].sum()),
            reward_sq_sum=float((rewards[finite] ** 2).sum()), reward_count=int(finite.sum()),
            truncated=sum(1 for c in grown.completion_ids if not c or c[-1] not in eos_and_pad),
            prompt_tokens=sum(len(p) for p in grown.prompt_ids), per_func=per_func,
            group_sizes=Counter(grown.sizes))

    def _flush_reward_logs(self, scored: ScoredRollout) -> None:
        """TRL's end of `_generate_and_score_completions`, for this rollout: the completions table (prompts,
        completions, rewards, advantages and the reward functions' `log_extra` columns) gathered over ranks, and
        the `log_metric` values averaged over ranks. Names are sorted so that every rank gathers in one order."""
        pending = trl_private.take_reward_metrics(self)
        metrics = trl_private.metrics(self)
        for name in self._ranks.union(pending):
            values = pending.get(name, [])
            total, count = self._ranks.sum([sum(values), len(values)])
            if count:
                metrics[name].append(total / count)
        if not self.log_completions:
            return
        logs, grown = trl_private.completion_logs(self), scored.grown
        logs["prompt"].extend(_gathered(self._ranks, grown.prompts))
        logs["completion"].extend(_gathered(self._ranks, grown.completions))
        for i, name in enumerate(self.reward_func_names):
            logs["rewards"][name].extend(_gathered(self._ranks, scored.rewards_per_func[:, i].tolist()))
        logs["advantages"].extend(_gathered(self._ranks, scored.advantages.tolist()))
        for column in self._ranks.union(scored.extra_columns):
            values = scored.extra_columns.get(column, [None] * len(grown))
            logs["extra"][column].extend(_gathered(self._ranks, values))

    # ------------------------------------------------------------------------------------------------ the batch

    def _assemble(self, scored: ScoredRollout) -> dict:
        """The rollout's batch: the sequences in the loss laid out over micro-steps of equal rows on every rank
        (`_layout`), padded; reference/old log-probs; what normalises the loss."""
        args, device, grown = self.args, self.accelerator.device, scored.grown
        kept, layout, rows = self._layout(scored)
        n_micro = self._n_micro = len(layout)
        src, real = pad_layout(layout, rows, kept)
        batch = build_tensors(src, real, grown.prompt_ids, grown.completion_ids, self._pad_id(),
                              set(self.eos_token_ids) | {self._pad_id()}, self.mask_truncated_completions,
                              self.pad_to_multiple_of, device)
        batch["advantages"] = torch.tensor([float(scored.advantages[i]) if r else 0.0 for i, r in zip(src, real)],
                                           device=device)
        batch["seq_weight"] = torch.tensor([1.0 if r else 0.0 for r in real], device=device)
        aux_rows = self._aux.prepare_joint(n_micro, self._stats) if self._aux.joint else [0] * n_micro
        tokens = (batch["completion_mask"] * batch["tool_mask"]).sum(-1).view(n_micro, rows).sum(-1).tolist()
        real_rows = [sum(real[j * rows:(j + 1) * rows]) for j in range(n_micro)]
        totals = self._ranks.sum([float(len(kept))] + tokens + real_rows + aux_rows)
        tokens = totals[1:1 + n_micro]
        self._aux.rows = [int(x) for x in totals[1 + 2 * n_micro:]]
        self._micro_step_rows = [int(a + b) for a, b in zip(totals[1 + n_micro:1 + 2 * n_micro], self._aux.rows)]
        batch["num_sequences"] = torch.tensor(totals[0], device=device)
        batch["num_items_in_batch"] = torch.tensor(sum(tokens), device=device)
        self._micro_num_items = None
        if args.rollout_schedule == "epoch":
            # An optimizer step's objective: the sum of its sequences' losses over the nominal step size (the
            # study divides by 4 even in a last, shorter step); TRL's token-normalised losses by its tokens.
            batch["sequence_scale"] = torch.tensor(1.0 / (args.per_device_train_batch_size
                                                          * args.gradient_accumulation_steps), device=device)
            acc = args.gradient_accumulation_steps
            self._micro_num_items = [torch.tensor(sum(tokens[k - k % acc:k - k % acc + acc])
                                                  * args.steps_per_generation / acc, device=device)
                                     for k in range(n_micro)]
        if totals[0] or sum(self._micro_step_rows) or self._step_had_backward:  # else no rank runs a forward
            self._add_logps(batch, src, real, self._sampler_tensor(grown, src, batch["completion_ids"].size(1)))
        self._rollout_global_step = self.state.global_step
        return batch

    def _layout(self, scored: ScoredRollout) -> tuple[list[int], list[list[int]], int]:
        """(sequences in the loss, the sequences of each micro-step, rows per micro-step), equal counts on every
        rank. "batch": shuffled and dealt round-robin over steps_per_generation micro-steps (TRL's way).
        "epoch": problem by problem in rollout order, per_device_train_batch_size * gradient_accumulation_steps
        per optimizer step (the study's one pass), at least one step."""
        args = self.args
        kept = scored.keep.nonzero(as_tuple=True)[0].tolist()
        most = self._ranks.max(len(kept))
        if args.rollout_schedule == "batch":
            random.Random(int(torch.randint(0, 2**31 - 1, (1,)).item())).shuffle(kept)  # TRL shuffles too
            spg = args.steps_per_generation
            return kept, deal_round_robin(kept, spg), rows_per_micro_step(most, spg)
        kept.sort(key=lambda i: (scored.grown.group_of[i], i))  # top-ups come last in rollout order
        bs, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
        n_steps = max(1, -(-most // (bs * accumulation)))
        return kept, deal_in_order(kept, n_steps, bs * accumulation, accumulation, bs), bs

    def _sampler_tensor(self, grown: GrownGroups, src: list, width: int) -> torch.Tensor | None:
        """The sampler's log-probs of the batch's completion tokens, (rows, width) like `completion_ids`: NaN where
        unknown (padding, the dummy row, a round without them). None when no completion of the rollout has them
        on any rank (TRL's backends)."""
        if self._engine is None:  # the same on every rank
            return None
        have = any(lp is not None for lp in grown.sampler_logps)
        if not self._ranks.max(int(have)):
            return None
        return sampler_logps_rows(grown.sampler_logps, src, width).to(self.accelerator.device)

    def _pad_id(self) -> int:
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        return tokenizer.pad_token_id

    @torch.no_grad()
    def _add_logps(self, batch, src, real, sampler_logps=None):
        """Reference log-probs (beta != 0) and old log-probs (when a rollout outlives an optimizer step, or for the
        sampler correction), computed once per rollout, for the sequences in the loss only; padding rows copy
        those of the row they repeat. With the sampler's log-probs at hand, the old ones measure the gap."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        need_old = (self.args.gradient_accumulation_steps % generate_every != 0
                    or self.args.rollout_schedule == "epoch"  # the pass outlives its first optimizer step
                    or self._sampler_correction)  # the weight needs the trainer's log-probs at generation time
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
        # The same number of forwards on every rank (under FSDP each one gathers parameters collectively): as many
        # chunks of bs rows as the rank with the most rows needs; a rank with fewer repeats a chunk of its own.
        n_chunks = self._ranks.max(-(-len(rows) // bs))

        def forward(model):
            chunks = []
            for c in range(n_chunks):
                part = slice(c * bs, (c + 1) * bs) if c * bs < len(rows) else slice(0, min(bs, len(rows)))
                logps = trl_private.per_token_logps(self, model, input_ids[part], attention_mask[part],
                                                    logits_to_keep)
                if c * bs < len(rows):
                    chunks.append(logps.float())
            return torch.cat(chunks)[take]

        # Without dropout: the log-probs of the policy that sampled the rollout (generation runs without it). With
        # dropout active in the loss forward no cached value can match its random mask; computing the old
        # log-probs with a second, independent mask (as TRL does) would add a second noise to every ratio.
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                dropout_off(self.model):
            if need_old:
                # Only used after the policy has changed (see _compute_loss).
                batch["old_per_token_logps"] = forward(self.model)
                if sampler_logps is not None:
                    self._sampler_figures(batch, sampler_logps, real)
            if self.beta != 0.0:
                self.ref_forward_calls += 1
                # Summed over ranks like every SparkStats figure (each rank has its own rows).
                self._stats.ref_forward_sequences += int(self._ranks.sum([sum(real)])[0])
                if self.ref_model is not None:
                    batch["ref_per_token_logps"] = forward(self.ref_model)
                else:
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    name = "ref" if "ref" in getattr(unwrapped, "peft_config", {}) else None
                    with use_adapter(unwrapped, adapter_name=name):
                        batch["ref_per_token_logps"] = forward(self.model)

    def _sampler_figures(self, batch, sampler_logps, real) -> None:
        """The sampler/trainer gap of the rollout's tokens in the loss, logged (`stats.log_sampler_gap`) in every run
        that has both log-probs; with the correction on, also the importance weights (into the batch) and their
        figures."""
        mask = batch["completion_mask"] * batch["tool_mask"]
        rows = torch.tensor(real, dtype=torch.bool, device=mask.device)
        old = batch["old_per_token_logps"]
        gap = sampler_mismatch_sums(old, sampler_logps, mask, rows)
        fig = None
        if self._sampler_correction:
            args = self.args
            weights = sampler_importance_weights(
                old, sampler_logps, mask, args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_min,
                args.vllm_importance_sampling_clip_max)
            batch["importance_sampling_ratio"] = weights
            fig = sampler_weight_figures(weights, mask, rows)
        log_sampler_gap(self._ranks, gap, fig, trl_private.metrics(self), self._stats)

    # ------------------------------------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs):
        # Wraps GRPOTrainer._compute_loss in training: old log-probs are the current ones (ratio exactly 1) until
        # the policy changes, and the loss is normalised by the rollout's global sequence/token count so that
        # padding rows and uneven ranks change nothing.
        if not (self._spark_path and self.model.training and "seq_weight" in inputs):
            if self.loss_type == "spark":  # evaluation batches come from TRL's path: a plain mean over sequences
                return self._spark_eval_loss(model, inputs)
            return super()._compute_loss(model, inputs)
        if self.state.global_step == self._rollout_global_step:
            inputs = {k: v for k, v in inputs.items() if k != "old_per_token_logps"}
        loss = self._spark_loss(model, inputs) if self.loss_type == "spark" else self._trl_loss(model, inputs)
        if self._aux.joint:
            loss = loss + self._aux.joint_loss(model, self._position, self._stats, trl_private.metrics(self),
                                               self.current_gradient_accumulation_steps)
        return loss

    def _sequence_scale(self, inputs) -> float:
        """The factor that turns a sum of per-sequence losses on this rank into its share of the optimizer step's
        objective. "batch": the mean over the rollout's N sequences; DDP averages gradients over the P ranks, and
        the rollout spans steps_per_generation micro-steps of which an optimizer step takes
        gradient_accumulation_steps. "epoch": set by `_assemble`."""
        if "sequence_scale" in inputs:
            return float(inputs["sequence_scale"])
        return (self.accelerator.num_processes * self.args.steps_per_generation
                / (self.current_gradient_accumulation_steps * float(inputs["num_sequences"].clamp(min=1.0))))

    def _spark_loss(self, model, inputs):
        """`loss_type="spark"`: `spark_policy_loss` per sequence, summed with `_sequence_scale`."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps = trl_private.per_token_logps(self, model, input_ids, attention_mask, inputs["completion_ids"].size(1))
        old = inputs.get("old_per_token_logps")
        mask = inputs["completion_mask"] * inputs["tool_mask"]
        per_seq, ratio, kl = spark_policy_loss(
            logps, logps.detach() if old is None else old, inputs.get("ref_per_token_logps"), inputs["advantages"],
            mask, self.epsilon_low, self.epsilon_high, self.beta, inputs.get("importance_sampling_ratio"))
        loss = (per_seq * inputs["seq_weight"]).sum() * self._sequence_scale(inputs)
        self._log_loss_figures(ratio.detach(), None if kl is None else kl.detach(), inputs, mask)
        return loss

    def _log_loss_figures(self, ratio, kl, inputs, mask) -> None:
        """ratio_mean, clip_ratio/* and both KL averages (token-weighted `kl`, the card's `kl/sequence_mean`),
        global over ranks in one reduction; padding rows are masked out."""
        sums = clip_sums(ratio, inputs["advantages"], mask, self.epsilon_low, self.epsilon_high)
        if kl is not None:
            sums += kl_sums(kl, mask, inputs["seq_weight"])
        red = self._ranks.sum(sums)
        tok = max(red[1], 1.0)
        m = trl_private.metrics(self)
        m["ratio_mean"].append(red[0] / tok)
        m["clip_ratio/low_mean"].append(red[2] / tok)
        m["clip_ratio/high_mean"].append(red[3] / tok)
        m["clip_ratio/region_mean"].append((red[2] + red[3]) / tok)
        if kl is not None:
            kl_token_sum, kl_tokens, kl_seq_sum, kl_seqs = red[4:8]
            m["kl"].append(kl_token_sum / max(kl_tokens, 1.0))
            if kl_seqs:
                m["kl/sequence_mean"].append(kl_seq_sum / kl_seqs)  # the reference card's "GRPO KL"
            self._stats.kl_sum += kl_token_sum
            self._stats.kl_tokens += int(kl_tokens)
            self._stats.kl_seq_sum += kl_seq_sum
            self._stats.kl_seqs += int(kl_seqs)

    def _trl_loss(self, model, inputs):
        """TRL's loss types, re-weighted from TRL's per-micro-batch mean to the rollout's global normalisation."""
        metrics = trl_private.metrics(self)
        n_kl = len(metrics["kl"])
        # TRL multiplies its per-token loss by the batch's importance_sampling_ratio only on its vLLM path.
        corrected = self._sampler_correction and "importance_sampling_ratio" in inputs
        with trl_private.sampler_correction_in_loss(self, corrected):
            loss = super()._compute_loss(model, inputs)
        if self.loss_type in ("grpo", "sapo", "luspo", "dr_grpo"):
            # TRL averages over the B rows of the micro-batch and divides by the accumulation steps.
            loss = loss * inputs["prompt_ids"].size(0) * self.current_gradient_accumulation_steps \
                * self._sequence_scale(inputs)
        if self.beta != 0.0 and len(metrics["kl"]) > n_kl:
            tokens = self._ranks.sum([float((inputs["completion_mask"] * inputs["tool_mask"]).sum())])[0]
            self._stats.kl_sum += metrics["kl"][-1] * tokens
            self._stats.kl_tokens += int(tokens)
        return loss

    def _spark_eval_loss(self, model, inputs):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps = trl_private.per_token_logps(self, model, input_ids, attention_mask, inputs["completion_ids"].size(1))
        per_seq, _, _ = spark_policy_loss(
            logps, logps.detach(), inputs.get("ref_per_token_logps"), inputs["advantages"],
            inputs["completion_mask"], self.epsilon_low, self.epsilon_high, self.beta)
        return per_seq.mean()


def _group_rows(inputs: list[dict], k0: int) -> list[dict]:
    """One dataset row per group: TRL's sampler repeats each row `k0` times in a row."""
    rows = [inputs[i] for i in range(0, len(inputs), k0)]
    for g, row in enumerate(rows):
        if any(inputs[g * k0 + j]["prompt"] != row["prompt"] for j in range(k0)):
            raise RuntimeError("a generation batch must hold whole groups of min_generations identical prompts")
    return rows


@contextlib.contextmanager
def dropout_off(model):
    """Dropout modules in eval mode (no dropout) for the duration, the rest of the model as it is."""
    kinds = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
             torch.nn.FeatureAlphaDropout)
    switched = [m for m in model.modules() if isinstance(m, kinds) and m.training]
    for m in switched:
        m.eval()
    try:
        yield
    finally:
        for m in switched:
            m.train()


def _without_weight(micro: dict) -> dict:
    """A copy of a micro-batch in which no row counts (for a micro-step after the end of the pass)."""
    return {**micro, "seq_weight": torch.zeros_like(micro["seq_weight"]),
            "tool_mask": torch.zeros_like(micro["tool_mask"])}


def _gathered(ranks: Ranks, values: list) -> list:
    return [v for part in ranks.gather(list(values)) for v in part]
