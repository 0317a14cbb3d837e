"""The trainer's figures: per rollout (`RolloutFigures`, logged each time completions are sampled) and per epoch
(`SparkStats`, what a study runner records per iteration). Both are global over ranks."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .collectives import Ranks


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
    rollouts_no_attempt: int = 0  # ... of which made no attempt (a stub; ExecutionOutcome.no_attempt)
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
    ref_forward_sequences: int = 0  # sequences that went through the reference forward
    # |logp_trainer_old - logp_sampler| over the tokens in the loss, where the sampler reports log-probs (the fast
    # engine) and old log-probs are computed (rollout_schedule="epoch", or the sampler correction on)
    sampler_logp_diff_sum: float = 0.0
    sampler_logp_tokens: int = 0
    sampler_logp_diff_max: float = 0.0
    optimizer_steps: int = 0  # optimizer steps taken with a gradient
    optimizer_steps_skipped: int = 0  # optimizer steps in which no rank had anything in the loss: not taken
    aux_examples: Counter = field(default_factory=Counter)
    aux_examples_unused: int = 0  # joint mode: examples beyond aux_batch_size per micro-step
    aux_loss_sum: float = 0.0
    aux_steps: int = 0

    def summary(self) -> dict[str, Any]:
        def ratio(a, b):
            return a / b if b else None

        return {
            "train_pass_rate": ratio(self.rollouts_passed, self.rollouts_with_outcome),
            "no_attempt_share": ratio(self.rollouts_no_attempt, self.rollouts_with_outcome),
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
            "sampler_logp_diff_mean": ratio(self.sampler_logp_diff_sum, self.sampler_logp_tokens),
            "sampler_logp_diff_max": self.sampler_logp_diff_max if self.sampler_logp_tokens else None,
            "optimizer_steps": self.optimizer_steps,
            "optimizer_steps_skipped": self.optimizer_steps_skipped,
            "aux_examples": dict(self.aux_examples),
            "aux_examples_unused": self.aux_examples_unused,
            "aux_mean_loss": ratio(self.aux_loss_sum, self.aux_steps),
            "aux_steps": self.aux_steps,
        }


@dataclass
class RolloutFigures:
    """What one rollout (a generation batch, or an epoch's rollouts) produced, summed over ranks by `reduced`."""

    groups: int = 0
    completions: int = 0
    topped_up: int = 0  # groups that grew beyond min_generations
    without_variance: int = 0  # groups whose final rewards have no variance
    completion_tokens: int = 0
    generated_tokens: int = 0  # with top_up_mode="prefetch", includes the spares never shown to the reward
    tokens_saved: float = 0.0  # (max_generations - size) x the group's mean completion length, over groups
    in_loss: int = 0  # sequences that enter the loss
    passed: int = 0  # completions whose ExecutionOutcome passed every test
    judged: int = 0  # completions with an ExecutionOutcome
    no_attempt: int = 0  # ... that make no attempt at the problem (ExecutionOutcome.no_attempt)
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    reward_count: int = 0  # completions with a finite reward
    truncated: int = 0  # completions that end without an EOS (cut at max_completion_length)
    prompt_tokens: int = 0
    per_func: list = field(default_factory=list)  # per reward function: [sum of finite rewards, their count]
    group_sizes: Counter = field(default_factory=Counter)

    def reduced(self, ranks: Ranks) -> "RolloutFigures":
        """The figures summed over ranks: one reduction of every number, one gather of the size histogram."""
        names = [f.name for f in dataclasses.fields(self) if f.name not in ("per_func", "group_sizes")]
        flat = [float(getattr(self, n)) for n in names] + [float(x) for pair in self.per_func for x in pair]
        total = ranks.sum(flat)
        out = RolloutFigures(**{n: (v if isinstance(getattr(self, n), float) else int(v))
                                for n, v in zip(names, total)})
        rest = total[len(names):]
        out.per_func = [[rest[2 * i], int(rest[2 * i + 1])] for i in range(len(self.per_func))]
        for sizes in ranks.gather(dict(self.group_sizes)):
            out.group_sizes.update(sizes)
        return out

    def add_to(self, stats: SparkStats) -> None:
        stats.rollouts += self.completions
        stats.rollouts_with_outcome += self.judged
        stats.rollouts_passed += self.passed
        stats.rollouts_no_attempt += self.no_attempt
        stats.completion_tokens += self.completion_tokens
        stats.reward_sum += self.reward_sum
        stats.reward_count += self.reward_count
        stats.groups += self.groups
        stats.groups_topped_up += self.topped_up
        stats.groups_without_variance += self.without_variance
        stats.group_sizes.update(self.group_sizes)
        stats.sequences_in_loss += self.in_loss
        stats.tokens_saved += self.tokens_saved

    def log(self, metrics: dict, reward_func_names: list[str]) -> None:
        """Into TRL's per-step metrics (`trainer._metrics["train"]`): spark's own and TRL's usual names."""
        groups, n = max(self.groups, 1), max(self.completions, 1)
        m = metrics
        m["spark/group_size_mean"].append(self.completions / groups)
        m["spark/frac_groups_topped_up"].append(self.topped_up / groups)
        m["spark/frac_groups_without_variance"].append(self.without_variance / groups)
        m["spark/completions"].append(self.completions)
        m["spark/completion_tokens"].append(self.completion_tokens)
        m["spark/generated_tokens"].append(self.generated_tokens)
        m["spark/tokens_saved_vs_max_generations"].append(self.tokens_saved)
        m["spark/frac_sequences_in_loss"].append(self.in_loss / n)
        if self.judged:
            m["spark/train_pass_rate"].append(self.passed / self.judged)
            m["spark/no_attempt_share"].append(self.no_attempt / self.judged)
        count = self.reward_count
        mean = self.reward_sum / max(count, 1)
        m["reward"].append(mean)
        # Sample std (TRL's nanstd), from the sums.
        m["reward_std"].append(math.sqrt(max(self.reward_sq_sum / max(count, 1) - mean ** 2, 0.0)
                                         * count / max(count - 1, 1)))
        m["frac_reward_zero_std"].append(self.without_variance / groups)
        m["completions/mean_length"].append(self.completion_tokens / n)
        m["completions/clipped_ratio"].append(self.truncated / n)
        for name, (total, count) in zip(reward_func_names, self.per_func):
            m[f"rewards/{name}/mean"].append(total / count if count else float("nan"))


def log_sampler_gap(ranks: Ranks, gap: list[float], weights: list[float] | None, metrics: dict,
                    stats: SparkStats) -> None:
    """The sampler/trainer gap of a rollout's tokens in the loss, global over ranks, into TRL's per-step metrics
    under TRL's names and into `stats`. `gap` is this rank's `sampler_mismatch_sums` [sum |diff|, tokens, max];
    `weights` (with the sampler correction on) its `sampler_weight_figures` [sum, count, min, max]. The mean
    |diff| is token-weighted over all ranks (TRL averages the ranks' means)."""
    diff_sum, tokens, diff_max = gap
    fig = weights
    total = ranks.sum([diff_sum, tokens] + (fig[:2] if fig else []))
    extremes = ranks.gather([diff_max] + (fig[2:] if fig else []))
    m = metrics
    if total[1]:
        m["sampling/sampling_logp_difference/mean"].append(total[0] / total[1])
        m["sampling/sampling_logp_difference/max"].append(max(e[0] for e in extremes))
        stats.sampler_logp_diff_sum += total[0]
        stats.sampler_logp_tokens += int(total[1])
        stats.sampler_logp_diff_max = max(stats.sampler_logp_diff_max, *(e[0] for e in extremes))
    if fig and total[3]:
        m["sampling/importance_sampling_ratio/mean"].append(total[2] / total[3])
        m["sampling/importance_sampling_ratio/min"].append(min(e[1] for e in extremes))
        m["sampling/importance_sampling_ratio/max"].append(max(e[2] for e in extremes))


class ExtraColumns:
    """The `log_extra` columns of the reward functions over a rollout's scoring rounds, one value per completion
    in scoring order: a column not reported in a round gets None for that round's completions.

    Example:
    ```python
    >>> extra = ExtraColumns()
    >>> extra.add_round({"status": ["ok", "error"]}, 2)
    >>> extra.add_round({"note": ["x"]}, 1)
    >>> extra.columns
    {'status': ['ok', 'error', None], 'note': [None, None, 'x']}
    ```
    """

    def __init__(self):
        self.columns: dict[str, list] = {}
        self.rows = 0

    def add_round(self, values: dict[str, list], n: int) -> None:
        for name in list(self.columns) + [k for k in values if k not in self.columns]:
            column = self.columns.setdefault(name, [None] * self.rows)
            got = list(values.get(name, []))[:n]
            column.extend(got + [None] * (n - len(got)))
        self.rows += n
