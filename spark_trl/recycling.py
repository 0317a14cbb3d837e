"""The auxiliary-recycling hook and the study's objective (Condition C).

An auxiliary objective sees the rollouts of the GRPO pass with their execution outcomes and contributes a loss:

```python
class MyObjective(AuxiliaryObjective):
    required_columns = ("reference",)           # dataset columns it reads; checked when the trainer is built

    def build(self, rollouts: list[Rollout], ranks=None) -> list[AuxExample]:
        ...                                     # supervised examples from this process's rollouts; weight 0 =
                                                # not used; `ranks` (spark_trl.collectives.Ranks): for global caps

    def loss(self, model, batch: list[AuxExample]) -> torch.Tensor:
        ...                                     # a scalar; the trainer multiplies it by `aux_loss_scale`
```

`SparkGRPOTrainer` calls `build` once per epoch (`aux_mode="phase"`: then one auxiliary epoch of micro-batches
of `aux_batch_size`, with the trainer's optimizer) or once per rollout (`aux_mode="joint"`: a micro-batch of at
most `aux_batch_size` examples joins the GRPO loss of each micro-step). `build` may take `ranks`: every process
calls it at the same time, so an objective can make collective decisions (the built-in caps are global).

The built-in `RecyclingObjective` is the study's: from each group of rollouts it builds chat examples under the
reviewer system prompt:

* pointwise: problem + one solution -> "Correct." / "Incorrect.";
* pairwise: problem + a failing and a passing solution in random A/B order -> "A." / "B." (the passing one);
* reflection: problem + a failing solution + the tail of its error output -> a passing solution of the same
  group (one, drawn once per group), or the problem's reference solution when none passed, as a ```python block.

As the study: pairwise and reflection examples come from the first `failing_per_group` (2) failing rollouts of
each group, in rollout order; caps 200/200/400 per build over all processes together; per-type weights
(0.0/0.1/1.0 by default: pointwise examples are dropped); the cross-entropy on the assistant tokens only, and
truncation on the prompt side so that a target is never cut.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from .outcome import ExecutionOutcome
from .prompts import REVIEWER_SYSTEM_PROMPT, extract_code

KINDS = ("pointwise", "pairwise", "reflection")
# The study's per-kind loss weights and per-build caps (SparkGRPOConfig's aux_*_weight / aux_max_* defaults).
STUDY_WEIGHTS = {"pointwise": 0.0, "pairwise": 0.1, "reflection": 1.0}
STUDY_CAPS = {"pointwise": 200, "pairwise": 200, "reflection": 400}


@dataclass
class Rollout:
    """One completion of the GRPO pass, as an auxiliary objective sees it."""

    prompt: Any  # the prompt as in the dataset (chat messages or text)
    completion: str  # the completion's text
    reward: float
    advantage: float
    group: int  # completions of the same prompt in the same generation batch share it
    outcome: ExecutionOutcome | None = None  # None when no reward function reports outcomes
    row: dict[str, Any] = field(default_factory=dict)  # the dataset row's other columns (task_id, reference, ...)

    @property
    def passed(self) -> bool | None:
        return None if self.outcome is None else self.outcome.all_passed

    @property
    def code(self) -> str:
        """The executed program when known, else the program extracted from the completion."""
        if self.outcome is not None and self.outcome.code:
            return self.outcome.code
        return extract_code(self.completion, self.row.get("entry_point"))

    @property
    def problem(self) -> str:
        """The task as the policy saw it: the last user message (or the text prompt)."""
        if isinstance(self.prompt, list):
            users = [m["content"] for m in self.prompt if m.get("role") == "user"]
            return users[-1] if users else ""
        return str(self.prompt)


@dataclass
class AuxExample:
    """A supervised chat example; `input_ids`/`labels` are set by the objective that built it (-100 = no loss)."""

    kind: str
    messages: list[dict[str, str]]
    weight: float
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


class AuxiliaryObjective:
    """Interface of an auxiliary objective; see the module docstring."""

    required_columns: tuple[str, ...] = ()

    def build(self, rollouts: list[Rollout], ranks=None) -> list[AuxExample]:
        raise NotImplementedError

    def loss(self, model, batch: list[AuxExample]) -> torch.Tensor:
        raise NotImplementedError

    def dummy_example(self) -> AuxExample:
        """A tiny example that a rank without examples runs with weight 0 to stay in step with the others."""
        raise NotImplementedError


class RecyclingObjective(AuxiliaryObjective):
    """The study's Condition C objective: pointwise, pairwise and reflection examples from the rollouts.

    Example:
    ```python
    >>> objective = RecyclingObjective(tokenizer, weights={"pointwise": 0.0, "pairwise": 0.1, "reflection": 1.0})
    >>> examples = objective.build(rollouts)           # list[AuxExample], weight-0 kinds already dropped
    >>> loss = objective.loss(model, examples[:2])     # weighted CE on the assistant tokens
    ```
    """

    required_columns = ("reference",)

    def __init__(self, tokenizer, weights: dict[str, float] | None = None, caps: dict[str, int] | None = None,
                 max_length: int = 1024, error_tail_lines: int = 6, seed: int = 0, failing_per_group: int = 2):
        self.tokenizer = tokenizer
        self.failing_per_group = failing_per_group
        self.weights = {**STUDY_WEIGHTS, **(weights or {})}
        self.caps = {**STUDY_CAPS, **(caps or {})}
        self.max_length = max_length
        self.error_tail_lines = error_tail_lines
        self.seed = seed
        self._builds = 0
        self.dropped_too_long = 0

    @classmethod
    def from_config(cls, tokenizer, args) -> "RecyclingObjective":
        """The objective that a `SparkGRPOConfig`'s `aux_*` fields describe."""
        return cls(
            tokenizer,
            weights={"pointwise": args.aux_pointwise_weight, "pairwise": args.aux_pairwise_weight,
                     "reflection": args.aux_reflection_weight},
            caps={"pointwise": args.aux_max_pointwise, "pairwise": args.aux_max_pairwise,
                  "reflection": args.aux_max_reflection},
            max_length=args.aux_max_length, error_tail_lines=args.aux_error_tail_lines, seed=args.seed,
            failing_per_group=args.aux_failing_per_group,
        )

    # -------------------------------------------------------------------------------------------- examples

    def build(self, rollouts: list[Rollout], ranks=None) -> list[AuxExample]:
        """Examples of every kind whose weight is > 0, each kind capped over all processes (a uniform random
        subset of the candidates of every process), in a seeded random order."""
        rng = random.Random(self.seed * 1_000_003 + self._builds)
        shared = random.Random(self.seed * 1_000_033 + self._builds)  # the same draws on every process
        self._builds += 1
        candidates = self._candidates(rollouts, rng)
        examples = []
        for kind in KINDS:
            weight = float(self.weights.get(kind, 0.0))
            if weight <= 0:
                continue  # weight-0 examples are dropped, never stepped on
            for answer_kind, messages in _global_subset(candidates[kind], self.caps.get(kind), shared, ranks):
                example = self._tokenize(AuxExample(kind=answer_kind, messages=messages, weight=weight))
                if example is not None:
                    examples.append(example)
        return examples

    def _candidates(self, rollouts: list[Rollout], rng: random.Random) -> dict[str, list]:
        """Every example the rollouts allow, per kind, group by group."""
        groups: dict[int, list[Rollout]] = {}
        for r in rollouts:
            if r.passed is not None:
                groups.setdefault(r.group, []).append(r)
        candidates: dict[str, list[tuple[str, list[dict[str, str]]]]] = {k: [] for k in KINDS}
        for members in groups.values():
            passing = [r for r in members if r.passed]
            failing = [r for r in members if not r.passed][:self.failing_per_group]  # the first ones, in order
            candidates["pointwise"] += [self._pointwise(r) for r in members]
            if passing:
                candidates["pairwise"] += [self._pairwise(r, rng.choice(passing), rng) for r in failing]
            if failing:
                fix = rng.choice(passing).code if passing else (failing[0].row.get("reference") or "")
                if fix.strip():
                    candidates["reflection"] += [self._reflection(r, fix) for r in failing]
        return candidates

    def _chat(self, user: str, answer: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": REVIEWER_SYSTEM_PROMPT}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}]

    def _pointwise(self, r: Rollout):
        user = (f"Problem:\n{r.problem}\n\nCandidate solution:\n```python\n{r.code}\n```\n\n"
                "Does this solution pass all the tests of the problem? Answer Correct. or Incorrect.")
        return "pointwise", self._chat(user, "Correct." if r.passed else "Incorrect.")

    def _pairwise(self, failing: Rollout, passing: Rollout, rng: random.Random):
        a_passes = rng.random() < 0.5
        a, b = (passing, failing) if a_passes else (failing, passing)
        user = (f"Problem:\n{failing.problem}\n\nSolution A:\n```python\n{a.code}\n```\n\n"
                f"Solution B:\n```python\n{b.code}\n```\n\n"
                "Exactly one of the two solutions passes all the tests. Which one? Answer A. or B.")
        return "pairwise", self._chat(user, "A." if a_passes else "B.")

    def _reflection(self, failing: Rollout, fix: str):
        outcome = failing.outcome
        tail = "\n".join((outcome.error_tail or "").strip().splitlines()[-self.error_tail_lines:])
        status = outcome.status.value.replace("_", " ")
        user = (f"Problem:\n{failing.problem}\n\nThis solution fails ({status}):\n```python\n{failing.code}\n```\n\n"
                f"Error output:\n{tail or '(none)'}\n\nWrite a corrected solution. Return only Python code.")
        return "reflection", self._chat(user, f"```python\n{fix.strip()}\n```")

    def _tokenize(self, example: AuxExample) -> AuxExample | None:
        tok = self.tokenizer
        prompt = tok.apply_chat_template(example.messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(example.messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
        budget = self.max_length - len(target_ids)
        if budget < 8:
            self.dropped_too_long += 1  # the target itself does not fit: cutting it would teach a broken answer
            return None
        if len(prompt_ids) > budget:
            # Cut the middle of the prompt: keep its head (system prompt, start of the task) and its tail (the
            # code or error output next to the answer, and the assistant header).
            head = budget // 4
            prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - (budget - head):]
        example.input_ids = list(prompt_ids) + list(target_ids)
        example.labels = [-100] * len(prompt_ids) + list(target_ids)
        return example

    def dummy_example(self) -> AuxExample:
        example = self._tokenize(AuxExample(kind="dummy", messages=self._chat("ok", "ok"), weight=0.0))
        return example

    # -------------------------------------------------------------------------------------------- loss

    def loss(self, model, batch: list[AuxExample]) -> torch.Tensor:
        """Cross-entropy on the assistant tokens: token mean per example, weighted by its kind's weight, averaged
        over the batch."""
        device = next(p for p in model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            attention[i, :n] = 1
        ids, labels, attention = ids.to(device), labels.to(device), attention.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        target = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        valid = (target != -100).float()
        per_example = (ce * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)
        weights = torch.tensor([e.weight for e in batch], device=device, dtype=per_example.dtype)
        return (per_example * weights).sum() / len(batch)


def _global_subset(pool: list, cap: int | None, shared: random.Random, ranks=None) -> list:
    """This process's share of a uniform random subset of at most `cap` of all processes' candidates (every
    process draws the same subset of global indices with `shared`), in a random order."""
    counts = ranks.gather(len(pool)) if ranks is not None and ranks.world > 1 else [len(pool)]
    offset = sum(counts[:ranks.rank]) if len(counts) > 1 else 0
    total = sum(counts)
    chosen = shared.sample(range(total), total if cap is None else min(cap, total))
    return [pool[i - offset] for i in chosen if offset <= i < offset + len(pool)]
