"""Collapse detection: the monitor fires on a reward that rises while the pass rate falls (steps and iterations),
once, naming cause and remedy; stays quiet on learning and on noise; is wired into SparkGRPOTrainer by default
and into the study runner's rows and summary line."""

from __future__ import annotations

import warnings

import pytest
from datasets import Dataset

from spark_trl.monitor import CollapseMonitor, CollapseWarning
from spark_trl.runner import iteration_summary, results_table

# The measured SmolLM2 run under the study's scoring (held-out pass@1 0.158 -> 0 while the reward rose).
COLLAPSE_ROWS = [
    {"iteration": 0, "heldout/pass@1": 0.158},
    {"iteration": 1, "heldout/pass@1": 0.175, "train_pass_rate": 0.020, "reward": -0.099, "no_attempt": 0.05},
    {"iteration": 2, "heldout/pass@1": 0.133, "train_pass_rate": 0.025, "reward": -0.073, "no_attempt": 0.10},
    {"iteration": 3, "heldout/pass@1": 0.100, "train_pass_rate": 0.010, "reward": -0.056, "no_attempt": 0.40},
    {"iteration": 4, "heldout/pass@1": 0.000, "train_pass_rate": 0.005, "reward": -0.042, "no_attempt": 0.90},
]
# ... and the same command with penalties 0: it learns.
LEARNING_ROWS = [{"iteration": i, "heldout/pass@1": p, "train_pass_rate": t, "reward": t and t * 1.2}
                 for i, (p, t) in enumerate([(0.158, None), (0.267, 0.016), (0.367, 0.05), (0.425, 0.1),
                                             (0.408, 0.15), (0.392, 0.16), (0.408, 0.168)])]


def test_iteration_check_fires_on_the_measured_collapse_once_with_cause_and_remedy():
    monitor = CollapseMonitor(reward_mode="study")
    with pytest.warns(CollapseWarning, match="reward rose while the pass rate fell") as caught:
        fired = [monitor.check_iterations(COLLAPSE_ROWS[:n], eval_key="heldout/pass@1") for n in range(2, 6)]
    # Iterations 1->2 (held-out falls), 2->3 (both fall): two in a row at iteration 3.
    assert fired == [False, False, True, False] and len(caught) == 1
    message = monitor.message
    assert "iterations 1-3" in message and "study's scoring" in message and "reward_mode='progress'" in message
    assert "-0.099 -> -0.056" in message and "0.175 -> 0.100" in message


def test_iteration_check_quiet_on_learning_and_on_one_bad_iteration():
    monitor = CollapseMonitor(reward_mode="progress")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not monitor.check_iterations(LEARNING_ROWS, eval_key="heldout/pass@1")
        # One iteration of rising reward and falling pass rate is not a trend (patience 2).
        assert not monitor.check_iterations(COLLAPSE_ROWS[:3], eval_key="heldout/pass@1")
    assert not monitor.fired
    with pytest.warns(CollapseWarning):
        assert CollapseMonitor(patience=1).check_iterations(COLLAPSE_ROWS[:3], eval_key="heldout/pass@1")


def _feed(monitor, pairs, no_attempt=None):
    for i, (reward, passed) in enumerate(pairs):
        logs = {"reward": reward, "spark/train_pass_rate": passed}
        if no_attempt is not None:
            logs["spark/no_attempt_share"] = no_attempt[i]
        monitor.observe(logs, step=i + 1)


def test_step_window_fires_on_divergence_and_names_the_window():
    monitor = CollapseMonitor(window=8)
    steps = [(-0.10, 0.06), (-0.11, 0.05), (-0.09, 0.07), (-0.10, 0.06),
             (-0.06, 0.02), (-0.05, 0.01), (-0.05, 0.02), (-0.04, 0.00)]
    with pytest.warns(CollapseWarning, match="last 8 logged steps"):
        _feed(monitor, steps)
    assert monitor.fired and "no-attempt share 0" not in monitor.message  # none logged
    with warnings.catch_warnings():  # once only
        warnings.simplefilter("error")
        _feed(monitor, steps)


@pytest.mark.parametrize("steps", [
    [(0.1, 0.1), (0.12, 0.12), (0.15, 0.14), (0.2, 0.2), (0.22, 0.21), (0.25, 0.25), (0.3, 0.28), (0.31, 0.3)],
    [(-0.1, 0.05), (-0.1, 0.06), (-0.1, 0.05), (-0.1, 0.05), (-0.09, 0.05), (-0.1, 0.04), (-0.1, 0.05), (-0.1, 0.05)],
    # The reward rises by noise only, the pass rate falls by noise only.
    [(0.0, 0.30), (0.0, 0.31), (0.01, 0.30), (0.0, 0.30), (0.01, 0.30), (0.01, 0.29), (0.0, 0.30), (0.01, 0.30)],
])
def test_step_window_quiet_when_learning_flat_or_noisy(steps):
    monitor = CollapseMonitor(window=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _feed(monitor, steps)
    assert not monitor.fired


def test_step_window_fires_when_most_completions_stop_trying():
    monitor = CollapseMonitor(window=4)
    with pytest.warns(CollapseWarning, match="make no attempt"):
        _feed(monitor, [(0.0, 0.1)] * 4, no_attempt=[0.1, 0.3, 0.6, 0.7])
    assert "no-attempt share 0.650" in monitor.message


def test_plain_trl_log_keys_and_bad_arguments():
    monitor = CollapseMonitor(window=4)
    with pytest.warns(CollapseWarning):
        for reward, passed in [(-0.1, 0.2), (-0.1, 0.2), (0.05, 0.05), (0.06, 0.04)]:
            monitor.observe({"reward": reward, "execution/passed": passed, "execution/no_attempt": 0.0})
    monitor = CollapseMonitor(window=4)
    monitor.observe({"eval_loss": 1.0})  # not a training log: ignored
    assert monitor.history == []
    with pytest.raises(ValueError, match="even number"):
        CollapseMonitor(window=3)
    with pytest.raises(ValueError, match="patience"):
        CollapseMonitor(patience=0)


def test_spark_trainer_monitors_by_default_through_its_callbacks(tiny_model_path, tmp_path):
    from spark_trl import SparkGRPOConfig, SparkGRPOTrainer
    from spark_trl.reward import ExecutionReward

    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Write add."}]] * 4,
                            "tests": [["assert add(1, 2) == 3"]] * 4, "entry_point": ["add"] * 4})
    args = SparkGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                           max_completion_length=4, per_device_train_batch_size=4, min_generations=4,
                           max_generations=4, collapse_window=4, disable_tqdm=True)
    trainer = SparkGRPOTrainer(model=tiny_model_path, reward_funcs=[ExecutionReward(mode="study")], args=args,
                               train_dataset=ds)
    monitor = trainer.collapse_monitor
    assert monitor in trainer.callback_handler.callbacks and monitor.reward_mode == "study"
    with pytest.warns(CollapseWarning, match="study's scoring"):
        for reward, passed in [(-0.15, 0.1), (-0.15, 0.1), (-0.05, 0.0), (-0.04, 0.0)]:
            trainer.log({"reward": reward, "spark/train_pass_rate": passed})  # HF Trainer's on_log path
    assert monitor.fired
    with pytest.raises(ValueError, match="collapse_window"):
        SparkGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, collapse_window=5)


def test_rows_table_and_summary_show_no_attempt_and_the_warning():
    rows = [dict(r) for r in COLLAPSE_ROWS]
    rows[0]["heldout/no_attempt"] = 0.0
    rows[4]["heldout/no_attempt"] = 1.0
    rows[4].update(train_seconds=50.0, eval_seconds=5.0, kl=0.0093, collapse_warning="Training may be collapsing")
    table = results_table(rows, ["heldout"])
    assert "No-attempt (train)" in table.splitlines()[0] and "| 0.90 | 1.00 |" in table
    line = iteration_summary(rows[4], rows, ["heldout"], 6)
    assert line.startswith("iteration 4/6 | heldout pass@1 0.000 (-0.158) | train pass rate 0.005 | no-attempt 0.90")
    assert "WARNING: Training may be collapsing" in line and "training 50 s, eval 5 s" in line
