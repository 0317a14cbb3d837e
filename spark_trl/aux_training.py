"""How `SparkGRPOTrainer` trains on an auxiliary objective (the study's Condition C); what the objective builds
from the rollouts is `spark_trl.recycling`'s.

The trainer owns one `AuxiliaryTraining` and calls it at four points:

1. `collect` after each rollout is scored: the rollout's completions as `Rollout`s, kept for the epoch
   (`aux_mode="phase"`) or for the rollout's micro-steps (`aux_mode="joint"`).
2. joint mode, `prepare_joint` while the rollout's batch is laid out: the objective's examples, at most
   `aux_batch_size` per micro-step.
3. joint mode, `joint_loss` in each micro-step's loss: that micro-step's auxiliary loss, added to the GRPO loss.
4. phase mode, `run_phase` at the end of each epoch: one auxiliary epoch with the trainer's optimizer.

Lockstep: every rank runs the same forwards and the same collectives, in the same order, whatever its own number
of examples (under FSDP a forward gathers parameters collectively; DDP all-reduces gradients at every backward
and optimizer step). A rank without examples runs a weight-0 batch where another rank has a real one.
"""

from __future__ import annotations

import inspect
import random
from collections import Counter
from typing import TYPE_CHECKING

from .collectives import Ranks
from .recycling import AuxExample, AuxiliaryObjective, Rollout
from .stats import SparkStats

if TYPE_CHECKING:
    from .trainer import ScoredRollout


class AuxiliaryTraining:
    """The auxiliary objective's side of training: its rollouts, its examples per micro-step (joint mode) and its
    phase (phase mode). `on`/`joint`/`phase` say whether and how it trains (`aux_loss_scale > 0` and an
    objective, `args.aux_mode`).

    Example:
    ```python
    >>> aux = AuxiliaryTraining(objective, args, Ranks(accelerator), accelerator, fsdp=False)
    >>> aux.collect(scored)                                     # after each rollout
    >>> aux.run_phase(model, model, optimizer, stats, epoch=1.0)  # phase mode, at the end of the epoch
    ```
    """

    def __init__(self, objective: AuxiliaryObjective | None, args, ranks: Ranks, accelerator, fsdp: bool):
        self.objective = objective
        self.args = args
        self.ranks = ranks
        self.accelerator = accelerator
        self.fsdp = fsdp
        self.on = objective is not None and args.aux_loss_scale > 0
        self.joint = self.on and args.aux_mode == "joint"
        self.phase = self.on and args.aux_mode == "phase"
        self.epoch_rollouts: list[Rollout] = []  # phase mode: this rank's rollouts of the epoch so far
        self.pending: list[Rollout] = []  # joint mode: the current rollout's, until it is laid out over micro-steps
        self.batches: list[list[AuxExample]] = []  # joint mode: this rank's examples of each micro-step
        self.rows: list[int] = []  # joint mode: the examples of each micro-step, all ranks
        self.group_counter = 0  # groups collected so far: numbers each rollout's groups apart from the others'

    def collect(self, scored: "ScoredRollout") -> None:
        """The rollout's completions as the objective sees them."""
        grown = scored.grown
        new = [Rollout(prompt=grown.prompts[i], completion=_text(grown.completions[i]),
                       reward=float(scored.rewards[i]), advantage=float(scored.advantages[i]),
                       group=self.group_counter + grown.group_of[i], outcome=grown.outcomes[i],
                       row={k: v for k, v in grown.rows[grown.group_of[i]].items() if k != "prompt"})
               for i in range(len(grown))]
        self.group_counter += len(grown.rows)
        if self.phase:
            self.epoch_rollouts.extend(new)
        else:
            self.pending = new  # spread over the rollout's micro-steps once they are laid out

    def build(self, rollouts: list[Rollout]) -> list[AuxExample]:
        """The objective's examples with a weight; every rank calls it at the same time (`build` may take `ranks`
        for collective decisions, such as the built-in objective's global caps)."""
        objective = self.objective
        if "ranks" in inspect.signature(objective.build).parameters:
            examples = objective.build(rollouts, ranks=self.ranks)
        else:
            examples = objective.build(rollouts)
        return [e for e in examples if e.weight > 0]

    def count(self, examples: list[AuxExample], stats: SparkStats) -> None:
        """The examples trained on, per kind, summed over ranks."""
        counts = Counter(e.kind for e in examples)
        kinds = self.ranks.union(set(counts) | {"pointwise", "pairwise", "reflection"})
        for kind, total in zip(kinds, self.ranks.sum([counts.get(k, 0) for k in kinds])):
            if total:
                stats.aux_examples[kind] += int(total)

    # ------------------------------------------------------------------------------------------------ joint mode

    def prepare_joint(self, n_micro: int, stats: SparkStats) -> list[int]:
        """The pending rollout's examples dealt over its `n_micro` micro-steps, at most aux_batch_size per
        micro-step so that memory is bounded whatever the rollout yields; the rest are left unused (counted).
        Returns this rank's examples per micro-step; the trainer sums them over ranks into `rows`."""
        examples = self.build(self.pending)
        random.Random(self.args.seed + self.group_counter).shuffle(examples)
        bs = self.args.aux_batch_size
        self.batches = [examples[j * bs:(j + 1) * bs] for j in range(n_micro)]
        used = examples[:n_micro * bs]
        self.count(used, stats)
        stats.aux_examples_unused += int(self.ranks.sum([len(examples) - len(used)])[0])
        return [len(b) for b in self.batches]

    def joint_loss(self, model, position: int, stats: SparkStats, metrics: dict, accumulation_steps: int):
        """The auxiliary loss of the micro-step at `position`. Whenever any rank has examples every rank runs one
        forward (a weight-0 dummy example where it has none): under FSDP a forward gathers parameters collectively.
        Under DDP the forward goes through the unwrapped model (a second forward through the DDP wrapper before
        one backward is not allowed); the gradients still reach the shared parameters and are reduced with the
        GRPO loss's. Under FSDP it goes through the wrapped model, whose root unit gathers the parameters."""
        if position >= len(self.rows) or not self.rows[position]:
            return 0.0
        batch = self.batches[position] if position < len(self.batches) else []
        aux_model = model if self.fsdp else self.accelerator.unwrap_model(model)
        aux = self.objective.loss(aux_model, batch or [self.objective.dummy_example()])
        # The figures are averaged over the ranks that had a batch.
        total, count = self.ranks.sum([float(aux.detach()) if batch else 0.0, 1.0 if batch else 0.0])
        stats.aux_loss_sum += total / count
        stats.aux_steps += 1
        metrics["aux/loss"].append(total / count)
        # DDP averages gradients over all ranks; rescale so that the result is the mean over the ranks that had
        # a batch (a rank without one would otherwise halve the weight of the others' examples).
        weight = self.accelerator.num_processes / count if batch else 0.0
        return self.args.aux_loss_scale * weight * aux / accumulation_steps

    # ------------------------------------------------------------------------------------------------ phase mode

    def run_phase(self, model_wrapped, model, optimizer, stats: SparkStats, epoch: float | None) -> None:
        """One auxiliary epoch over this epoch's rollouts, with the trainer's optimizer: forwards through
        `model_wrapped`, gradients clipped over `model`'s parameters (the Trainer's two handles on the model).

        Every rank runs the same number of optimizer steps: ranks with fewer examples pad with weight-0 batches,
        whose zero loss still joins the gradient all-reduce. No step is taken when no rank has an example.
        """
        objective, args = self.objective, self.args
        examples = self.build(self.epoch_rollouts)
        self.count(examples, stats)
        self.epoch_rollouts = []
        random.Random(args.seed + int(epoch or 0)).shuffle(examples)
        bs = args.aux_batch_size
        batches = [examples[i:i + bs] for i in range(0, len(examples), bs)]
        n_steps = self.ranks.max(len(batches))
        if n_steps == 0:
            return
        model_wrapped.train()
        loss_sum, steps = 0.0, 0
        for step in range(n_steps):
            if step < len(batches):
                batch, weight = batches[step], 1.0
            else:
                batch, weight = [examples[0] if examples else objective.dummy_example()], 0.0
            # DDP averages gradients over all ranks: make the step the mean over the ranks with a real batch,
            # not a mean diluted by the weight-0 padding batches of ranks that ran out of examples.
            if self.accelerator.num_processes > 1:
                (real,) = self.ranks.sum([weight])
                weight *= self.accelerator.num_processes / max(real, 1.0)
            with self.accelerator.autocast():
                aux = objective.loss(model_wrapped, batch)
            self.accelerator.backward(aux * args.aux_loss_scale * weight)
            if args.max_grad_norm is not None and args.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            if weight:
                loss_sum += float(aux.detach())
                steps += 1
        # Global figures: the mean over every rank's real batches, and the number of optimizer steps taken.
        loss_sum, steps = self.ranks.sum([loss_sum, steps])
        stats.aux_loss_sum += loss_sum * n_steps / max(steps, 1)
        stats.aux_steps += n_steps


def _text(completion) -> str:
    """A completion's text: the last message's content for a chat completion."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion
