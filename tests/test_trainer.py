"""SparkGRPOTrainer on the tiny offline model: real TRL training loops, real generation, no mocks."""

from __future__ import annotations

import sys

import pytest
import torch
from datasets import Dataset

from spark_trl import SparkGRPOConfig, SparkGRPOTrainer
from spark_trl.testing import PromptKeyedReward


def _dataset(names):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Solve task {n}."}] for n in names],
                              "task_id": list(names)})


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                max_completion_length=6, logging_steps=1, disable_tqdm=True, seed=0, shuffle_dataset=False)
    base.update(kw)
    return SparkGRPOConfig(**base)


def test_top_up_exactly_for_groups_without_variance_ref_once_and_ratio_one(tiny_model_path, tmp_path):
    """One generation batch of three groups: 'vary' stays at 4, 'late' grows to 6, 'flat' to 8 and is left out
    of the loss. With PEFT + beta > 0 the reference forward runs once for that rollout (10 sequences), although
    the rollout serves two optimizer steps (num_iterations=2); the ratio is exactly 1 on the first step despite
    LoRA dropout, and is not on the second (cached old log-probs, changed policy)."""
    from peft import LoraConfig

    reward = PromptKeyedReward()
    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=3, num_iterations=2,
                 max_steps=2, loss_type="spark", beta=0.05, learning_rate=5e-2)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    trainer = SparkGRPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args,
                               train_dataset=_dataset(["vary", "late", "flat"]), peft_config=lora)
    trainer.train()

    assert reward.calls[0] == ["vary"] * 4 + ["late"] * 4 + ["flat"] * 4
    assert reward.calls[1] == ["late"] * 2 + ["flat"] * 2  # only the groups without variance are topped up
    assert reward.calls[2] == ["flat"] * 2
    assert len(reward.calls) == 3  # one rollout for both optimizer steps
    stats = trainer.spark_stats_history[-1]
    assert stats["group_sizes"] == {4: 1, 6: 1, 8: 1}
    assert stats["frac_groups_topped_up"] == pytest.approx(2 / 3)
    assert stats["frac_groups_without_variance"] == pytest.approx(1 / 3)
    assert stats["rollouts"] == 18 and stats["sequences_in_loss"] == 10
    assert trainer.ref_forward_calls == 1 and stats["ref_forward_sequences"] == 10
    steps = [h for h in trainer.state.log_history if "ratio_mean" in h]
    assert steps[0]["ratio_mean"] == 1.0  # exactly: old log-probs = current ones, detached
    assert steps[1]["ratio_mean"] != 1.0
    assert steps[0]["spark/group_size_mean"] == 6.0
    assert steps[0]["spark/completions"] == 18
    assert steps[0]["spark/frac_sequences_in_loss"] == pytest.approx(10 / 18)
    assert stats["mean_kl"] is not None and stats["mean_kl"] >= 0


class CapturingTrainer(SparkGRPOTrainer):
    """Keeps every generation batch it builds (the real method's output)."""

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.captured = getattr(self, "captured", []) + [batch]
        return batch


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_steps_per_generation_and_accumulation_use_every_kept_row_once(tiny_model_path, tmp_path, loss_type):
    """steps_per_generation=3 with gradient accumulation 2: each generation batch is cut into 3 equal micro-batches
    holding every sequence in the loss exactly once (zero-weight padding rows make up the rest); TRL's loss types
    run on them with old log-probs cached for the steps after the policy changed."""
    reward = PromptKeyedReward()
    args = _args(tmp_path, per_device_train_batch_size=4, steps_per_generation=3, gradient_accumulation_steps=2,
                 max_steps=3, loss_type=loss_type, beta=0.02)
    trainer = CapturingTrainer(model=tiny_model_path, reward_funcs=reward, args=args,
                               train_dataset=_dataset(["vary", "late", "flat", "vary2", "flat2", "late2"]))
    trainer.train()
    assert trainer._step == 6 and len(trainer.captured) == 2
    for batch in trainer.captured:
        rows = batch["prompt_ids"].size(0)
        assert rows % 3 == 0
        weights = batch["seq_weight"].view(3, -1)
        assert weights.sum() == batch["num_sequences"]
        assert (weights.sum(1).max() - weights.sum(1).min()) <= 1  # real rows spread evenly
        assert torch.equal(batch["tool_mask"][:, 0].float(), batch["seq_weight"])
        assert torch.isfinite(batch["ref_per_token_logps"]).all() and "old_per_token_logps" in batch
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_an_optimizer_step_without_gradient_is_skipped(tiny_model_path, tmp_path):
    """Step 1 has a group with variance; step 2 only a group without (nothing in the loss on any rank): step 2 runs
    no forward, no backward and no optimizer update, so AdamW's momentum and weight decay leave the weights exactly
    as step 1 left them (a zero-gradient AdamW step would still move them), and it is counted as skipped."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.params = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.params.append(torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]))

    snapshots = Snapshots()
    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=2,
                 loss_type="spark", beta=0.1, min_generations=4, max_generations=6, learning_rate=1e-2,
                 weight_decay=0.1)
    trainer = CapturingTrainer(model=tiny_model_path, reward_funcs=PromptKeyedReward(), args=args,
                               train_dataset=_dataset(["vary", "flat"]), callbacks=[snapshots])
    forwards = []
    trainer.model.register_forward_hook(lambda m, i, o: forwards.append(trainer.state.global_step)
                                        if torch.is_grad_enabled() else None)
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters() if p.requires_grad])
    trainer.train()
    assert not torch.equal(snapshots.params[0], before)  # step 1 moved the weights
    assert torch.equal(snapshots.params[1], snapshots.params[0])  # step 2 did not: not even weight decay
    assert forwards == [0]  # one loss forward, in step 1
    stats = trainer.spark_stats_history[-1]
    assert (stats["optimizer_steps"], stats["optimizer_steps_skipped"]) == (1, 1)
    assert trainer.ref_forward_calls == 1 and stats["ref_forward_sequences"] == 4  # none for the empty batch
    assert int(trainer.captured[1]["num_sequences"]) == 0 and stats["group_sizes"] == {4: 1, 6: 1}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[1]["loss"] == 0.0 and logs[1]["spark/optimizer_step_skipped"] == 1.0
    assert "spark/optimizer_step_skipped" not in logs[0]


def test_peft_4bit_bitsandbytes_on_cpu(tiny_model_path, tmp_path):
    """QLoRA as in the study (NF4 double quant), beta > 0, adaptive groups: trains on CPU."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1,
                 loss_type="spark", beta=0.02)
    trainer = SparkGRPOTrainer(model=tiny_model_path, reward_funcs=PromptKeyedReward(), args=args,
                               train_dataset=_dataset(["vary", "late"]), peft_config=lora,
                               quantization_config=quant)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert "Linear4bit" in type(trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert changed, "the LoRA weights did not move"
    assert trainer.ref_forward_calls == 1


@pytest.mark.slow
def test_mean_reward_rises_on_a_verifiable_task(tiny_model_path, tmp_path):
    """Reward = share of completion tokens from the lower half of the vocabulary (checked exactly). With a fixed
    seed the mean reward climbs from about 0.45 to above 0.75 within 16 steps."""

    def low_half(completion_ids, **kwargs):
        return [sum(t < 160 for t in c) / max(len(c), 1) for c in completion_ids]

    args = _args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=16,
                 max_completion_length=8, loss_type="spark", learning_rate=2e-2, shuffle_dataset=True)
    trainer = SparkGRPOTrainer(model=tiny_model_path, reward_funcs=low_half, args=args,
                               train_dataset=_dataset([str(i) for i in range(8)]))
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 16
    first, last = sum(rewards[:3]) / 3, sum(rewards[-4:]) / 4
    assert last > first + 0.25 and last > 0.75, rewards


def test_bad_input_is_rejected_before_the_model_loads(tmp_path):
    """A model path that does not exist proves that nothing was loaded before the error."""

    def reward(completions, **kwargs):
        return [0.0] * len(completions)

    reward.required_columns = ("tests", "test_setup", "entry_point")
    ds = _dataset(["a", "b"])
    args = _args(tmp_path, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['tests', 'test_setup', 'entry_point'\]"):
        SparkGRPOTrainer(model="/nonexistent/model", reward_funcs=reward, args=args, train_dataset=ds)
    from spark_trl.reward import ExecutionReward

    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['tests'\] that execution_reward needs"):
        SparkGRPOTrainer(model="/nonexistent/model", reward_funcs=ExecutionReward(), args=args, train_dataset=ds)
    reward.required_columns = ()
    with pytest.raises(ValueError, match="aux_loss_scale=0.1 but no auxiliary objective"):
        SparkGRPOTrainer(model="/nonexistent/model", reward_funcs=reward, train_dataset=ds,
                         args=_args(tmp_path, per_device_train_batch_size=4, aux_loss_scale=0.1))
    args = _args(tmp_path, per_device_train_batch_size=4)
    args.max_generations = 2  # a config mutated after construction is checked again
    with pytest.raises(ValueError, match="max_generations"):
        SparkGRPOTrainer(model="/nonexistent/model", reward_funcs=reward, args=args, train_dataset=ds)


def test_spark_rollout_engine_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spark_trl.rollout", None)  # makes `import spark_trl.rollout` fail
    args = _args(tmp_path, per_device_train_batch_size=4, rollout_engine="spark")
    with pytest.raises(ValueError, match="rollout_engine='spark' needs spark_trl.rollout.FastRolloutEngine"):
        SparkGRPOTrainer(model="/nonexistent/model", reward_funcs=lambda completions, **k: [0.0] * len(completions),
                         args=args, train_dataset=_dataset(["a"]))


def test_spark_rollout_engine_glue(tiny_model_path, tmp_path, monkeypatch):
    """rollout_engine='spark' generates through spark_trl.rollout.FastRolloutEngine (the real one, counted):
    one call per generation round, weights synced once per optimizer step before generating."""
    import spark_trl.rollout as rollout

    calls = {"generate": [], "sync": 0}

    class CountingEngine(rollout.FastRolloutEngine):
        def generate(self, prompt_ids):
            calls["generate"].append(len(prompt_ids))
            return super().generate(prompt_ids)

        def sync_weights(self, model=None, *a, **k):
            calls["sync"] += 1
            return super().sync_weights(model, *a, **k)

    monkeypatch.setattr(rollout, "FastRolloutEngine", CountingEngine)
    reward = PromptKeyedReward()
    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=2,
                 loss_type="spark", rollout_engine="spark")
    trainer = SparkGRPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args,
                               train_dataset=_dataset(["vary", "flat"]))
    calls["sync"] = 0  # the engine may sync when it is built; count the trainer's calls
    trainer.train()
    assert isinstance(trainer.rollout_engine, CountingEngine)
    # step 1: vary (4), step 2: flat (4, grown twice by 2)
    assert calls["generate"] == [4, 4, 2, 2]
    assert calls["sync"] == 2
    assert trainer.spark_stats_history[-1]["rollouts"] == 12


def test_prefetch_top_ups_come_from_one_generation_round(tiny_model_path, tmp_path):
    """top_up_mode='prefetch': one generation call of max_generations per prompt; the rewards see exactly what
    the round-by-round mode shows them (4 each, then the top-ups of the groups without variance only)."""

    class CountingRounds(SparkGRPOTrainer):
        def _generate_round(self, prompts, per_prompt):
            self.rounds = getattr(self, "rounds", []) + [(len(prompts), per_prompt)]
            return super()._generate_round(prompts, per_prompt)

    reward = PromptKeyedReward()
    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=3, max_steps=1,
                 loss_type="spark", top_up_mode="prefetch")
    trainer = CountingRounds(model=tiny_model_path, reward_funcs=reward, args=args,
                             train_dataset=_dataset(["vary", "late", "flat"]))
    trainer.train()
    assert trainer.rounds == [(24, 8)]
    assert reward.calls == [["vary"] * 4 + ["late"] * 4 + ["flat"] * 4, ["late"] * 2 + ["flat"] * 2, ["flat"] * 2]
    assert trainer.spark_stats_history[-1]["group_sizes"] == {4: 1, 6: 1, 8: 1}
    log = trainer.state.log_history[0]
    assert log["spark/completions"] == 18 and log["spark/tokens_saved_vs_max_generations"] == 0
    assert log["spark/generated_tokens"] >= log["spark/completion_tokens"]


@pytest.mark.parametrize("sizes, message", [
    (dict(min_generations=1), "min_generations must be at least 2"),
    (dict(min_generations=4, max_generations=3), r"max_generations \(3\) must be >= min_generations \(4\)"),
    (dict(generation_increment=0), "generation_increment must be at least 1"),
])
def test_impossible_group_sizes_fail_at_config_time(tmp_path, sizes, message):
    from spark_trl import SparkGRPOConfig

    with pytest.raises(ValueError, match=message):
        SparkGRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **sizes)


def test_every_problem_of_an_epoch_is_trained_on(tiny_model_path, tmp_path):
    """6 problems, 4 prompts per generation batch: TRL's sampler would drop the last 2 problems of every epoch; here
    the last generation batch holds them plus the first 2 of the epoch's permutation."""
    reward = PromptKeyedReward()
    names = [f"vary{i}" for i in range(6)]
    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2,
                 min_generations=2, max_generations=2, loss_type="spark", shuffle_dataset=True)
    trainer = SparkGRPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=_dataset(names))
    trainer.train()
    assert trainer.state.global_step == 4  # 2 epochs of 2 generation batches, one optimizer step each
    for epoch in (reward.calls[:2], reward.calls[2:]):
        seen = [t for call in epoch for t in call[::2]]  # one entry per group
        assert len(seen) == 8 and set(seen) == set(names)
        assert seen[6:] == seen[:2]  # the remainder batch is filled from the start of the same permutation


def test_reward_log_extra_columns_reach_the_completions_table(tiny_model_path, tmp_path):
    """ExecutionReward reports each completion's execution status through TRL's `log_extra`; like TRL, the trainer
    puts it in the completions table beside the prompts (one value per completion, top-up rounds included), and
    averages its `log_metric` figures."""
    from spark_trl import trl_private
    from spark_trl.data import to_grpo_dataset
    from spark_trl.outcome import Status
    from spark_trl.problems import load_builtin
    from spark_trl.reward import ExecutionReward

    reward = ExecutionReward(timeout=5.0)
    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=1,
                 loss_type="spark", log_completions=True, max_generations=8)
    trainer = SparkGRPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args,
                               train_dataset=to_grpo_dataset(load_builtin("train")[:1]))
    trainer.train()
    logs = trl_private.completion_logs(trainer)
    n = trainer.spark_stats_history[-1]["rollouts"]
    statuses = list(logs["extra"]["execution_status"])
    # TRL's table keeps the last generation_batch_size (4) rows; the top-ups made 8 completions.
    assert n == 8 and len(statuses) == len(logs["prompt"]) == len(logs["advantages"]) == 4
    assert set(statuses) <= {s.value for s in Status}
    assert any(k.startswith("execution/") for h in trainer.state.log_history for k in h)


@pytest.mark.parametrize("disable_dropout", [False, True])
def test_old_log_probs_are_the_sampling_policy_s_without_dropout(tiny_model_path, tmp_path, disable_dropout):
    """A rollout serving two optimizer steps (num_iterations=2) caches old log-probs. They are those of the policy
    that sampled (no dropout: generation runs without it), whatever the LoRA dropout (0.5 here, with a random
    non-zero adapter so that dropout matters). With lr 0 and TRL's `disable_dropout=True` the ratio on the cached
    step is then exactly 1; with dropout active only the loss forward's own mask moves it."""
    from peft import LoraConfig

    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, num_iterations=2,
                 max_steps=2, loss_type="spark", learning_rate=0.0, disable_dropout=disable_dropout)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM", init_lora_weights=False)
    trainer = CapturingTrainer(model=tiny_model_path, reward_funcs=PromptKeyedReward(), args=args,
                               train_dataset=_dataset(["vary"]), peft_config=lora)
    trainer.train()
    batch = trainer.captured[0]
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    with torch.no_grad():
        t = batch["completion_ids"].size(1)
        logits = model(input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                       attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)).logits
        expected = torch.log_softmax(logits[:, -t - 1:-1].float(), -1).gather(
            -1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(batch["old_per_token_logps"][mask], expected[mask], rtol=0, atol=1e-5)
    ratios = [h["ratio_mean"] for h in trainer.state.log_history if "ratio_mean" in h]
    assert ratios[0] == 1.0  # the first step over a fresh rollout: old = current, detached
    if disable_dropout:
        assert ratios[1] == pytest.approx(1.0, abs=1e-6)
    else:
        assert abs(ratios[1] - 1.0) > 1e-3  # the loss forward's dropout noise
