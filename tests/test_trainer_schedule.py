"""rollout_schedule="epoch" (the study's): every problem's rollout first, then one pass with an optimizer step every
per_device_train_batch_size * gradient_accumulation_steps sequences in the loss; real TRL loops on the tiny model."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from spark_trl import SparkGRPOConfig, SparkGRPOTrainer
from spark_trl.grpo_math import spark_policy_loss
from spark_trl.testing import PromptKeyedReward

# 'vary' groups stay at 4 and vary; 'late' grows to 6; 'flat' grows to 8 and stays out of the loss.
TASKS = ["vary1", "flat1", "late1", "vary2", "vary3", "flat2"]
IN_LOSS = 4 + 6 + 4 + 4  # sequences per epoch


def _dataset(names):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Solve task {n}."}] for n in names],
                              "task_id": list(names)})


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                max_completion_length=6, logging_steps=1, disable_tqdm=True, seed=0, shuffle_dataset=False,
                rollout_schedule="epoch", lr_scheduler_type="constant", loss_type="spark",
                per_device_train_batch_size=2, gradient_accumulation_steps=2, steps_per_generation=4)
    base.update(kw)
    return SparkGRPOConfig(**base)


class Capturing(SparkGRPOTrainer):
    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.captured = getattr(self, "captured", []) + [{k: v.detach().clone() for k, v in batch.items()}]
        return batch


class Probe(TrainerCallback):
    """Reward calls made before each optimizer step, and the first step's accumulated gradient."""

    def __init__(self, reward, model_params):
        self.reward, self.params = reward, model_params
        self.calls_before_step, self.grads = [], None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.calls_before_step.append(len(self.reward.calls))
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.params() if p.grad is not None}


def _train_one_epoch(model_path, tmp_path, **kw):
    """One epoch of the study's schedule over TASKS; the trainer, its reward and the probe that watched it."""
    reward = PromptKeyedReward()
    trainer = Capturing(model=model_path, reward_funcs=reward, train_dataset=_dataset(TASKS),
                        args=_args(tmp_path, num_train_epochs=1, **kw))
    probe = Probe(reward, trainer.model.named_parameters)
    trainer.add_callback(probe)
    trainer.train()
    return trainer, reward, probe


def test_epoch_schedule_rolls_out_every_problem_then_makes_one_pass(tiny_model_path, tmp_path):
    """All reward calls (the whole epoch's rollouts, top-ups included) happen before the first optimizer step; the
    18 sequences in the loss make ceil(18 / 4) = 5 optimizer steps of 4, 4, 4, 4, 2 in problem order; the first is
    on-policy (ratio exactly 1), the later ones are off-policy and the clip acts; the Trainer's step counter ends
    the epoch at its upper bound (6 problems x 8 / 4 = 12)."""
    trainer, reward, probe = _train_one_epoch(tiny_model_path, tmp_path, learning_rate=5e-2, beta=0.05)

    assert probe.calls_before_step == [len(reward.calls)] * 5  # nothing sampled after the first step
    assert sorted({t for call in reward.calls for t in call}) == sorted(TASKS)
    stats = trainer.spark_stats_history[-1]
    assert (stats["sequences_in_loss"], stats["optimizer_steps"], stats["optimizer_steps_skipped"]) == (IN_LOSS, 5, 0)
    assert trainer.state.global_step == 12 and trainer.state.epoch == 1.0

    (batch,) = trainer.captured
    rows = batch["seq_weight"].view(10, 2)  # 5 steps x 2 micro-steps x 2 rows
    assert rows.sum(1).tolist() == [2.0] * 8 + [2.0, 0.0]
    assert float(batch["sequence_scale"]) == 0.25  # each sequence weighs 1/4 of its step, the last one's too
    # Rollouts are generated problem by problem in the epoch's order: vary1's group first.
    tasks = reward.calls[0][:4]
    assert tasks == ["vary1"] * 4
    logs = [h for h in trainer.state.log_history if "ratio_mean" in h]
    assert logs[0]["ratio_mean"] == 1.0 and logs[0]["clip_ratio/region_mean"] == 0.0
    assert all(h["ratio_mean"] != 1.0 for h in logs[1:])
    assert max(h["clip_ratio/region_mean"] for h in logs[1:]) > 0


def test_epoch_schedule_step_gradient_is_the_mean_over_its_four_sequences(tiny_model_path, tmp_path):
    """The first optimizer step's gradient equals, recomputed by hand, the gradient of the study's loss summed over
    its 4 sequences and divided by 4 (one step every 4 sequences, the study's loss/4 per backward)."""
    from transformers import AutoModelForCausalLM

    trainer, reward, probe = _train_one_epoch(tiny_model_path, tmp_path, learning_rate=1e-3, max_grad_norm=1e9)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model.train()
    b = trainer.captured[0]
    first = {k: v[:4] if v.dim() else v for k, v in b.items()}  # step 1: micro-steps 0 and 1, two rows each
    t = first["completion_ids"].size(1)
    logits = model(input_ids=torch.cat([first["prompt_ids"], first["completion_ids"]], 1),
                   attention_mask=torch.cat([first["prompt_mask"], first["completion_mask"]], 1)).logits[:, -t - 1:-1]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, first["completion_ids"].unsqueeze(-1)).squeeze(-1)
    per_seq, _, _ = spark_policy_loss(logps, logps.detach(), None, first["advantages"],
                                      first["completion_mask"] * first["tool_mask"])
    ((per_seq * first["seq_weight"]).sum() / 4).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.sqrt(sum((g ** 2).sum() for g in expected.values()))
    assert norm > 0
    for name, grad in expected.items():
        torch.testing.assert_close(probe.grads[name], grad, rtol=1e-4, atol=1e-6 * float(norm))


def test_epoch_schedule_covers_every_problem_each_epoch_and_resumes_from_its_saved_rollout(tiny_model_path, tmp_path):
    """Two epochs; a second trainer resumes from a checkpoint taken in the middle of epoch 1 with the trainer's
    epoch_state() (the epoch's rollout): it samples nothing more for epoch 1 and ends with the same weights."""
    from spark_trl.runner import save_checkpoint

    saved = {}

    class SaveAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                save_checkpoint(trainer_a, tmp_path / "ck", {"rows": []})
                saved["epoch_state"] = trainer_a.epoch_state()
                saved["calls"] = len(reward_a.calls)

    reward_a = PromptKeyedReward()
    trainer_a = SparkGRPOTrainer(model=tiny_model_path, reward_funcs=reward_a, train_dataset=_dataset(TASKS),
                                 args=_args(tmp_path / "a", num_train_epochs=2, learning_rate=1e-2, beta=0.05,
                                            shuffle_dataset=True), callbacks=[SaveAtStep3()])
    trainer_a.train()
    assert [h["optimizer_steps"] for h in trainer_a.spark_stats_history] == [5, 4]  # 'late1' varies at once in epoch 2
    epochs = [reward_a.calls[:saved["calls"]], reward_a.calls[saved["calls"]:]]
    for calls in epochs:
        assert sorted({t for c in calls for t in c}) == sorted(TASKS)
    # A fresh permutation per epoch, as the trainer visited the problems (not only as the helper computes it).
    orders = [list(dict.fromkeys(t for c in calls for t in c)) for calls in epochs]
    assert orders[0] != orders[1]

    class Restore(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            if not getattr(self, "done", False):
                trainer_b.load_epoch_state(saved["epoch_state"])
                self.done = True

    reward_b = PromptKeyedReward()
    reward_b.seen = set(TASKS)  # what reward_a had seen at the checkpoint: 'late' groups vary from then on
    trainer_b = SparkGRPOTrainer(model=tiny_model_path, reward_funcs=reward_b, train_dataset=_dataset(TASKS),
                                 args=_args(tmp_path / "b", num_train_epochs=2, learning_rate=1e-2, beta=0.05,
                                            shuffle_dataset=True), callbacks=[Restore()])
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "ck"))
    assert reward_b.calls == reward_a.calls[saved["calls"]:]  # epoch 2 only: epoch 1's rollout was restored
    for (name, a), b in zip(trainer_a.model.named_parameters(), trainer_b.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_steps=3), "set num_train_epochs, not max_steps"),
    (dict(lr_scheduler_type="linear"), "needs lr_scheduler_type 'constant'"),
    (dict(rollout_schedule="iteration"), "rollout_schedule must be one of"),
])
def test_epoch_schedule_settings_that_cannot_work_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kwargs)
