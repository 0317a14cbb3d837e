"""Growing groups: `min_generations` completions per prompt, then top-ups for groups without reward variance.

A round samples completions for some groups and scores them; after each round, every group whose rewards still have
no variance (population std <= `adaptive_std_threshold`) and holds fewer than `max_generations` gets
`generation_increment` more in the next round. With several processes every rank runs the same rounds with the
same number of prompts (a rank with fewer groups to grow pads with copies it throws away), because the generation
backends may be collective (vLLM server, FSDP, ZeRO-3).

`top_up_mode="prefetch"` samples `max_generations` per prompt in the first round and reveals the top-ups from
those samples: the same groups in distribution (the samples are i.i.d.), one backend call instead of up to three.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch

from .collectives import Ranks
from .grpo_math import group_std
from .outcome import ExecutionOutcome


@runtime_checkable
class ReportsOutcomes(Protocol):
    """A reward function that reports what happened to each completion it scored (as
    `spark_trl.reward.ExecutionReward` does): after each call, `last_outcomes` holds one `ExecutionOutcome` per
    completion of that call, in order. The trainer reads it for the train pass rate and the auxiliary objective."""

    last_outcomes: list[ExecutionOutcome]


# (prompts, per_prompt) -> (prompt_ids, completion_ids, completions, sampler log-probs): one call of the generation
# backend, where `prompts` holds each prompt `per_prompt` times in a row. The sampler's log-probs of the sampled
# tokens (one list per completion, aligned with its ids) are None when the backend does not report them.
Generate = Callable[[list, int], tuple[list, list, list, list | None]]
# (rows, prompts, completions, completion_ids) -> (rewards (n, reward functions), outcomes or None per completion)
Score = Callable[[list, list, list, list], tuple[torch.Tensor, list]]


@dataclass
class GrownGroups:
    """Every completion of a set of groups, in the order the reward functions saw them."""

    rows: list[dict]  # the dataset row of each group
    group_of: list[int] = field(default_factory=list)  # per completion: the index of its group in `rows`
    prompts: list = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    completions: list = field(default_factory=list)  # texts, or chat messages
    # per completion: the sampler's log-prob of each sampled token, or None where the backend gave none
    sampler_logps: list[list[float] | None] = field(default_factory=list)
    outcomes: list[ExecutionOutcome | None] = field(default_factory=list)
    reward_chunks: list[torch.Tensor] = field(default_factory=list)  # one (n_round, reward functions) per round
    sizes: list[int] = field(default_factory=list)  # final size of each group
    generated_tokens: int = 0  # every completion token sampled (prefetch: the unused spares too)

    def __len__(self) -> int:
        return len(self.group_of)

    def extend(self, other: "GrownGroups") -> None:
        """Append another set's groups and completions (its group indices shifted past this set's rows)."""
        offset = len(self.rows)
        self.rows += other.rows
        self.group_of += [offset + i for i in other.group_of]
        for name in ("prompts", "prompt_ids", "completion_ids", "completions", "sampler_logps", "outcomes",
                     "reward_chunks", "sizes"):
            getattr(self, name).extend(getattr(other, name))
        self.generated_tokens += other.generated_tokens

    def rewards_per_func(self, n_funcs: int) -> torch.Tensor:
        return torch.cat(self.reward_chunks) if self.reward_chunks else torch.zeros(0, n_funcs)

    def rewards(self, weights: torch.Tensor) -> torch.Tensor:
        """The weighted sum over reward functions; NaN where no function scored the completion (TRL's rule)."""
        per_func = self.rewards_per_func(len(weights))
        unscorable = torch.isnan(per_func).all(dim=1)
        rewards = (per_func * weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan
        return rewards


class GroupGrower:
    """Grows the groups of one generation batch (see the module docstring); `grow(rows)` -> `GrownGroups`."""

    def __init__(self, generate: Generate, score: Score, ranks: Ranks, reward_weights: torch.Tensor,
                 min_generations: int, max_generations: int, increment: int, std_threshold: float,
                 prefetch: bool = False):
        self.generate, self.score, self.ranks = generate, score, ranks
        self.weights = reward_weights
        self.k0, self.k_max, self.increment = min_generations, max_generations, increment
        self.threshold = std_threshold
        self.prefetch = prefetch and max_generations > min_generations

    def grow(self, rows: list[dict], filler: dict | None = None) -> GrownGroups:
        """`rows`: one dataset row per group (may be empty on a rank, then `filler` pads its backend calls)."""
        out = GrownGroups(rows=list(rows), sizes=[self.k0] * len(rows))
        spares: dict[int, list[tuple]] = defaultdict(list)
        self._round(out, spares, list(range(len(rows))), self.k0, filler, first=True)
        while True:
            needy = self._needy(out)
            # Every rank must run the same rounds: agree on the increments needed anywhere (a capped group grows
            # by less than the increment, so a round can have several).
            increments = self.ranks.union(needy)
            if not increments:
                return out
            for inc in increments:
                chosen = needy.get(inc, [])
                self._round(out, spares, chosen, inc, filler)
                for g in chosen:
                    out.sizes[g] += inc

    def _needy(self, out: GrownGroups) -> dict[int, list[int]]:
        """Groups still without reward variance and below max_generations, by the increment they get."""
        rewards = out.rewards(self.weights)
        group_of = torch.tensor(out.group_of, dtype=torch.long)
        by_increment: dict[int, list[int]] = defaultdict(list)
        for g, size in enumerate(out.sizes):
            if size < self.k_max and group_std(rewards[group_of == g]) <= self.threshold:
                by_increment[min(self.increment, self.k_max - size)].append(g)
        return by_increment

    def _round(self, out: GrownGroups, spares, groups: list[int], per_prompt: int, filler, first: bool = False):
        if self.prefetch and not first:
            taken = [spares[g].pop(0) for g in groups for _ in range(per_prompt)]
        else:
            taken = self._sample(out, spares, groups, per_prompt, filler, first)
            if taken is None:
                return
        if not groups:
            return
        round_rows = [out.rows[g] for g in groups for _ in range(per_prompt)]
        prompts = [row["prompt"] for row in round_rows]
        completions = [t[2] for t in taken]
        completion_ids = [t[1] for t in taken]
        rewards, outcomes = self.score(round_rows, prompts, completions, completion_ids)
        out.reward_chunks.append(rewards)
        out.outcomes.extend(outcomes)
        out.group_of.extend(g for g in groups for _ in range(per_prompt))
        out.prompts.extend(prompts)
        out.prompt_ids.extend(t[0] for t in taken)
        out.completion_ids.extend(completion_ids)
        out.completions.extend(completions)
        out.sampler_logps.extend(t[3] for t in taken)

    def _sample(self, out: GrownGroups, spares, groups: list[int], per_prompt: int, filler, first: bool):
        """One backend call with the same number of prompts on every rank; returns this rank's (prompt ids,
        completion ids, completion, sampler log-probs) for `groups`, `per_prompt` each, keeping prefetched extras
        as spares (with their log-probs, so that a top-up taken from them later keeps its own)."""
        n_global = self.ranks.max(len(groups))
        if n_global == 0:
            return None
        pad_row = out.rows[groups[0]] if groups else (out.rows[0] if out.rows else filler)
        if pad_row is None:
            raise RuntimeError("a rank without groups needs a filler prompt to join the other ranks' generation")
        sampled = self.k_max if (self.prefetch and first) else per_prompt
        prompt_rows = [out.rows[g] for g in groups] + [pad_row] * (n_global - len(groups))
        prompts = [row["prompt"] for row in prompt_rows for _ in range(sampled)]
        p_ids, c_ids, comps, logps = self.generate(prompts, sampled)
        logps = logps if logps is not None else [None] * len(c_ids)
        out.generated_tokens += sum(len(c) for c in c_ids[:len(groups) * sampled])
        taken = []
        for k, g in enumerate(groups):
            for j in range(sampled):
                n = k * sampled + j
                item = (p_ids[n], c_ids[n], comps[n], logps[n])
                (taken if j < per_prompt else spares[g]).append(item)
        return taken


def outcomes_of(reward_funcs: list, n: int) -> list[ExecutionOutcome | None]:
    """The outcomes that the first reward function declaring `ReportsOutcomes` reported for its last call of `n`
    completions (None for each when no function reports outcomes)."""
    for func in reward_funcs:
        if isinstance(func, ReportsOutcomes):
            outcomes = list(func.last_outcomes)
            if len(outcomes) != n:
                name = getattr(func, "__name__", type(func).__name__)
                raise RuntimeError(f"{name}.last_outcomes holds {len(outcomes)} outcomes after scoring {n} "
                                   "completions: it must hold one per completion of the last call")
            return outcomes
    return [None] * n
