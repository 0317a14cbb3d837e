"""The auxiliary-recycling hook: the study's example builder on crafted rollouts, and both training modes."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback

from spark_trl import SparkGRPOConfig, SparkGRPOTrainer
from spark_trl.outcome import ExecutionOutcome, Status
from spark_trl.prompts import REVIEWER_SYSTEM_PROMPT
from spark_trl.recycling import Rollout, RecyclingObjective

PROBLEM = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Write add(a, b)."}]
ERROR = "\n".join(f"line {i}" for i in range(10)) + "\nAssertionError"


def _rollout(code, passed, group, reference="def add(a, b):\n    return a + b"):
    status = Status.PASSED if passed else Status.WRONG_ANSWER
    outcome = ExecutionOutcome(status=status, code=code, error_tail="" if passed else ERROR)
    return Rollout(prompt=PROBLEM, completion=f"```python\n{code}\n```", reward=1.0 if passed else 0.0,
                   advantage=0.0, group=group, outcome=outcome,
                   row={"task_id": f"t{group}", "entry_point": "add", "reference": reference})


def _rollouts():
    return [
        # group 0: two passing, two failing
        _rollout("def add(a, b):\n    return b + a", True, 0),
        _rollout("def add(a, b):\n    return a - b", False, 0),
        _rollout("def add(a, b):\n    return a + b  # ok", True, 0),
        _rollout("def add(a, b):\n    return a * b", False, 0),
        # group 1: nothing passed -> reflection targets the reference
        _rollout("def add(a, b):\n    return 0", False, 1, reference="def add(a, b):\n    return sum((a, b))"),
        _rollout("def add(a, b):\n    return 1", False, 1, reference="def add(a, b):\n    return sum((a, b))"),
        # group 2: all pass -> only pointwise examples
        _rollout("def add(a, b):\n    return a+b", True, 2),
        # no outcome: ignored by every kind
        Rollout(prompt=PROBLEM, completion="def add(a, b): pass", reward=0.0, advantage=0.0, group=3),
    ]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def _decode_target(tokenizer, example):
    return tokenizer.decode([t for t in example.labels if t != -100])


def test_builder_makes_the_study_s_examples(tokenizer):
    objective = RecyclingObjective(tokenizer, weights={"pointwise": 0.5, "pairwise": 0.1, "reflection": 1.0},
                                   max_length=4096)
    examples = objective.build(_rollouts())
    kinds = [e.kind for e in examples]
    assert kinds.count("pointwise") == 7  # every judged rollout
    assert kinds.count("pairwise") == 2  # one per failing rollout of a group that has a passing one
    assert kinds.count("reflection") == 4  # one per failing rollout
    passing_codes = {r.code for r in _rollouts()[:4] if r.passed}
    for e in examples:
        assert e.messages[0] == {"role": "system", "content": REVIEWER_SYSTEM_PROMPT}
        assert e.weight == {"pointwise": 0.5, "pairwise": 0.1, "reflection": 1.0}[e.kind]
        answer = e.messages[-1]["content"]
        assert _decode_target(tokenizer, e).startswith(answer)  # CE only on the assistant turn
        assert len(e.input_ids) == len(e.labels)
        user = e.messages[1]["content"]
        if e.kind == "pointwise":
            correct = "return a - b" not in user and "return a * b" not in user and "return 0" not in user \
                and "return 1" not in user
            assert answer == ("Correct." if correct else "Incorrect.")
        elif e.kind == "pairwise":
            a_part = user.split("Solution A:")[1].split("Solution B:")[0]
            a_passes = any(code in a_part for code in passing_codes)
            assert answer == ("A." if a_passes else "B.")
        else:
            assert "line 4" not in user and "line 5" in user and "AssertionError" in user  # last 6 lines only
            if "return 0" in user or "return 1" in user:  # nothing passed: the reference, as a python block
                assert answer == "```python\ndef add(a, b):\n    return sum((a, b))\n```"
            else:
                assert answer in {f"```python\n{code}\n```" for code in passing_codes}  # a passing rollout


def test_builder_weights_caps_and_truncation(tokenizer):
    default = RecyclingObjective(tokenizer).build(_rollouts())
    assert {e.kind for e in default} == {"pairwise", "reflection"}  # pointwise weight 0.0: dropped
    capped = RecyclingObjective(tokenizer, caps={"reflection": 1, "pairwise": 0}).build(_rollouts())
    assert [e.kind for e in capped] == ["reflection"]
    # A small token budget cuts the prompt, never the target.
    short = RecyclingObjective(tokenizer, weights={"pairwise": 0.0}, max_length=120).build(_rollouts())
    assert short
    for e in short:
        assert len(e.input_ids) <= 120
        target = e.messages[-1]["content"]
        assert _decode_target(tokenizer, e).startswith(target)
        full = tokenizer.apply_chat_template(e.messages, tokenize=False)
        assert len(tokenizer(full, add_special_tokens=False)["input_ids"]) > 120  # really truncated


def test_loss_is_the_weighted_assistant_cross_entropy(tokenizer, tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    objective = RecyclingObjective(tokenizer, weights={"pointwise": 0.5}, max_length=4096)
    examples = [e for e in objective.build(_rollouts()) if e.kind in ("pointwise", "reflection")][:2]
    loss = objective.loss(model, examples)
    expected = 0.0
    for e in examples:
        out = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
        expected += e.weight * float(out.loss.detach())
    assert float(loss.detach()) == pytest.approx(expected / 2, rel=1e-4)


class OutcomeReward:
    """Passes a completion when its text length is even; exposes ExecutionOutcomes like ExecutionReward."""

    __name__ = "outcome_reward"
    required_columns = ("task_id",)

    def __init__(self):
        self.last_outcomes = []

    def __call__(self, prompts, completions, **kwargs):
        texts = [c[-1]["content"] for c in completions]
        self.last_outcomes = [
            ExecutionOutcome(status=Status.PASSED if len(t) % 2 == 0 else Status.WRONG_ANSWER, code=t,
                             error_tail="" if len(t) % 2 == 0 else "Traceback\nAssertionError")
            for t in texts]
        return [1.0 if o.all_passed else 0.0 for o in self.last_outcomes]


def _dataset(n):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"task {i}"}] for i in range(n)],
                              "task_id": [str(i) for i in range(n)],
                              "reference": ["def f():\n    return 1"] * n})


class EpochProbe(TrainerCallback):
    """A study runner's stand-in: what does on_epoch_end see?"""

    def __init__(self):
        self.seen = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        params = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        self.seen.append((self.trainer.spark_stats["aux_steps"], self.trainer.spark_stats["train_pass_rate"],
                          params.clone()))


@pytest.mark.slow
def test_phase_mode_runs_after_each_epoch_before_the_user_s_callbacks(tiny_model_path, tmp_path):
    probe = EpochProbe()
    args = SparkGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                           max_completion_length=6, logging_steps=1, disable_tqdm=True, per_device_train_batch_size=4,
                           gradient_accumulation_steps=1, num_train_epochs=2, loss_type="spark",
                           aux_objective="recycling", aux_loss_scale=0.5, aux_mode="phase", learning_rate=1e-3,
                           lr_scheduler_type="constant")  # the study: no schedule
    trainer = SparkGRPOTrainer(model=tiny_model_path, reward_funcs=OutcomeReward(), args=args,
                               train_dataset=_dataset(2), callbacks=[probe])
    probe.trainer = trainer
    last_grpo = []

    class LastStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            last_grpo.append(torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]).clone())

    trainer.add_callback(LastStep())
    trainer.train()
    assert len(probe.seen) == 2
    history = trainer.spark_stats_history
    for epoch, (aux_steps, pass_rate, params) in enumerate(probe.seen):
        assert aux_steps == history[epoch]["aux_steps"] > 0
        assert pass_rate is not None and 0.0 <= pass_rate <= 1.0
        n_examples = sum(history[epoch]["aux_examples"].values())
        assert aux_steps == -(-n_examples // 2)  # micro-batches of 2, one optimizer step each
        assert set(history[epoch]["aux_examples"]) <= {"pairwise", "reflection"}
    # The probe saw the weights after the auxiliary phase, not those of the epoch's last GRPO step.
    assert len(last_grpo) == 4
    assert not torch.equal(probe.seen[0][2], last_grpo[1])
    assert not torch.equal(probe.seen[1][2], last_grpo[3])


def test_joint_mode_adds_the_aux_loss_to_each_step(tiny_model_path, tmp_path):
    args = SparkGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                           max_completion_length=6, logging_steps=1, disable_tqdm=True, per_device_train_batch_size=4,
                           gradient_accumulation_steps=2, max_steps=2, loss_type="spark", beta=0.01,
                           aux_objective="recycling", aux_loss_scale=0.5, aux_mode="joint",
                           skip_zero_advantage="none")
    trainer = SparkGRPOTrainer(model=tiny_model_path, reward_funcs=OutcomeReward(), args=args,
                               train_dataset=_dataset(4))
    trainer.train()
    stats = trainer.spark_stats_history[-1]
    assert stats["aux_steps"] > 0 and stats["aux_mean_loss"] > 0
    assert any("aux/loss" in h for h in trainer.state.log_history)


def test_builder_uses_the_first_two_failing_rollouts_of_a_group_and_one_target(tokenizer):
    """A group of 8 with one pass: the study makes 2 pairwise and 2 reflection examples (from the first two failing
    rollouts, in rollout order), both reflections targeting the same passing rollout, not 7 + 7."""
    rollouts = [_rollout(f"def add(a, b):\n    return {i}", False, 0) for i in range(7)]
    rollouts.insert(3, _rollout("def add(a, b):\n    return a + b", True, 0))
    examples = RecyclingObjective(tokenizer, max_length=4096).build(rollouts)
    kinds = [e.kind for e in examples]
    assert kinds.count("pairwise") == 2 and kinds.count("reflection") == 2
    users = [e.messages[1]["content"] for e in examples]
    for user in users:
        assert "return 0" in user or "return 1" in user  # the first two failing rollouts only
    targets = {e.messages[-1]["content"] for e in examples if e.kind == "reflection"}
    assert targets == {"```python\ndef add(a, b):\n    return a + b\n```"}
    more = RecyclingObjective(tokenizer, max_length=4096, failing_per_group=7).build(rollouts)
    assert [e.kind for e in more].count("reflection") == 7


def test_joint_mode_bounds_examples_per_micro_step(tiny_model_path, tmp_path):
    """Joint mode runs at most aux_batch_size examples per micro-step (one forward of bounded size); a rollout's
    other examples are left unused and counted."""
    args = SparkGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                           max_completion_length=6, logging_steps=1, disable_tqdm=True, per_device_train_batch_size=4,
                           gradient_accumulation_steps=1, max_steps=2, loss_type="spark", aux_objective="recycling",
                           aux_loss_scale=0.5, aux_mode="joint", skip_zero_advantage="none", aux_batch_size=1,
                           aux_failing_per_group=4, aux_pairwise_weight=0.0)

    class Counting(SparkGRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            joint_loss = self._aux.joint_loss

            def counting(model, position, *rest):
                self.sizes = getattr(self, "sizes", []) + [len(self._aux.batches[position])]
                return joint_loss(model, position, *rest)

            self._aux.joint_loss = counting

    trainer = Counting(model=tiny_model_path, reward_funcs=OutcomeReward(), args=args, train_dataset=_dataset(4))
    trainer.train()
    stats = trainer.spark_stats_history[-1]
    assert trainer.sizes and max(trainer.sizes) <= 1
    assert sum(stats["aux_examples"].values()) == sum(trainer.sizes)
    assert stats["aux_examples_unused"] > 0


def test_phase_mode_under_deepspeed_is_refused_before_loading(tmp_path, monkeypatch):
    """As `accelerate launch` with a DeepSpeed config announces it (DeepSpeed itself is not installed here, so the
    launch environment is set once the config exists)."""
    args = SparkGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                           per_device_train_batch_size=4, aux_objective="recycling", aux_loss_scale=0.1)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="aux_mode='phase' does not work under DeepSpeed"):
        SparkGRPOTrainer(model="/nonexistent/model", reward_funcs=OutcomeReward(), args=args,
                         train_dataset=_dataset(2))
