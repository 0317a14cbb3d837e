"""spark_trl.profiling.StepProfiler on real trainers (tiny model, CPU): each phase charged to the call that does
it, the phases and the rest add up to the step, the figures reach TRL's logs."""

from __future__ import annotations

import time

import pytest
from datasets import Dataset
from peft import LoraConfig

from spark_trl import SparkGRPOConfig, SparkGRPOTrainer, trl_private
from spark_trl.profiling import PHASES, StepProfiler

SLEEP = 0.05


class SlowReward:
    """Rewards that vary within a group (so every step has a loss), taking SLEEP seconds per call."""

    __name__ = "slow_reward"

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts=None, completions=None, **kwargs):
        self.calls += 1
        time.sleep(SLEEP)
        return [float(i % 2) for i in range(len(completions))]


def _dataset(n=4):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Task {i}."}] for i in range(n)]})


def _lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _common(tmp_path):
    return dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                max_completion_length=6, logging_steps=1, disable_tqdm=True, seed=0, max_steps=2,
                per_device_train_batch_size=4, gradient_accumulation_steps=1, beta=0.05, learning_rate=1e-3)


def _check(profiler, trainer, reward):
    assert len(profiler.steps) == 2
    for step in profiler.steps:
        for phase in ("generate", "logps_no_grad", "loss_forward", "backward", "optimizer"):
            assert step[phase] > 0, phase
        assert step["total"] == pytest.approx(sum(step[p] for p in PHASES) + step["other"])
    # every reward call's sleep is charged to "reward", and to nothing else
    assert sum(s["reward"] for s in profiler.steps) >= SLEEP * reward.calls
    assert all(s["generate"] + s["reward"] <= s["total"] for s in profiler.steps)
    logged = [h for h in trainer.state.log_history if "time/reward" in h]
    assert len(logged) == 2 and logged[0]["time/total"] == pytest.approx(profiler.steps[0]["total"])
    table = profiler.table()
    assert "| reward |" in table and "| **total** |" in table
    assert set(profiler.summary()) == {*PHASES, "other", "total"}


def test_spark_trainer_with_its_engine(tiny_model_path, tmp_path):
    import spark_trl.rollout as rollout

    reward = SlowReward()
    args = SparkGRPOConfig(min_generations=4, max_generations=4, loss_type="spark", rollout_engine="spark",
                           **_common(tmp_path))
    trainer = SparkGRPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=_dataset(),
                               peft_config=_lora())
    assert isinstance(trainer.rollout_engine, rollout.FastRolloutEngine)
    profiler = StepProfiler().attach(trainer)
    trainer.train()
    _check(profiler, trainer, reward)
    with pytest.raises(RuntimeError, match="already attached"):
        profiler.attach(trainer)


def test_plain_trl_trainer(tiny_model_path, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    reward = SlowReward()
    args = GRPOConfig(num_generations=4, **_common(tmp_path))
    trainer = GRPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args, train_dataset=_dataset(),
                          peft_config=_lora())
    profiler = StepProfiler().attach(trainer)
    trainer.train()
    _check(profiler, trainer, reward)


def test_only_listed_privates_can_be_wrapped():
    with pytest.raises(ValueError, match="not one of the TRL privates"):
        trl_private.wrap_method(object(), "_some_other_private", lambda f: f)
    assert StepProfiler().table() == "(no optimizer step profiled)"
