"""The two optimisation schedules on a task with a known optimum, on CPU: which learns more per rollout?

A tiny Qwen2-architecture model (spark_trl.testing) is rewarded by the share of its completion tokens drawn from the
lower half of the vocabulary (checked exactly, no sandbox). Both schedules sample the same rollouts per epoch (every
problem once, groups of 4 topped up to 8) and see the same number of sequences per optimizer step:

* rollout_schedule="batch" (TRL's, on-policy): a fresh rollout of 4 problems for every optimizer step of 4 x 4
  sequences; the first step over a rollout is exactly on-policy;
* rollout_schedule="epoch" (the study's): all 16 problems first, then one pass of optimizer steps of 16 sequences
  in the loss (later steps off-policy, the clip acts).

Printed: the mean reward of the rollouts of each epoch (mean over seeds) and, for each schedule, the first epoch
whose mean reward reaches 0.9, measured in the same run.

    python benchmarks/schedule_compare.py --epochs 6 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def low_half(completion_ids, **kwargs):
    return [sum(t < 160 for t in c) / max(len(c), 1) for c in completion_ids]


def run(model_path: str, schedule: str, seed: int, epochs: int, lr: float, out: str) -> list[float]:
    from datasets import Dataset
    from transformers import PrinterCallback

    from spark_trl import SparkGRPOConfig, SparkGRPOTrainer

    names = [f"task {i}" for i in range(16)]
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": n}] for n in names]})
    common = dict(output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True,
                  logging_steps=1, seed=seed, max_completion_length=8, loss_type="spark", learning_rate=lr,
                  lr_scheduler_type="constant", num_train_epochs=epochs, min_generations=4, max_generations=8,
                  rollout_schedule=schedule)
    if schedule == "batch":  # 4 prompts per rollout and per optimizer step (16 completions before top-ups)
        sizes = dict(per_device_train_batch_size=4, gradient_accumulation_steps=4)
    else:  # 16 sequences in the loss per optimizer step; generation in chunks of 4 prompts
        sizes = dict(per_device_train_batch_size=4, gradient_accumulation_steps=4, steps_per_generation=4)
    trainer = SparkGRPOTrainer(model=model_path, reward_funcs=low_half, args=SparkGRPOConfig(**common, **sizes),
                               train_dataset=ds)
    trainer.remove_callback(PrinterCallback)  # the per-step logs; the epoch summaries are what is compared
    trainer.train()
    return [h["mean_reward"] for h in trainer.spark_stats_history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=2e-2)
    opts = parser.parse_args()

    from spark_trl.testing import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_path = str(build_tiny_model(f"{tmp}/model"))
        curves, seconds = {}, {}
        for schedule in ("batch", "epoch"):
            t0 = time.perf_counter()
            curves[schedule] = [run(model_path, schedule, seed, opts.epochs, opts.learning_rate, f"{tmp}/{schedule}")
                                for seed in range(opts.seeds)]
            seconds[schedule] = round(time.perf_counter() - t0, 1)
    mean = {s: [statistics.mean(c[e] for c in curves[s]) for e in range(opts.epochs)] for s in curves}
    reach = {s: next((e + 1 for e, x in enumerate(v) if x >= 0.9), None) for s, v in mean.items()}
    print(json.dumps({"mean_reward_per_epoch": {s: [round(x, 4) for x in v] for s, v in mean.items()},
                      "per_seed_final": {s: [round(c[-1], 4) for c in curves[s]] for s in curves},
                      "first_epoch_at_0.9": reach, "seconds": seconds}))


if __name__ == "__main__":
    main()
