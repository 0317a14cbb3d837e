"""Overhead of SparkGRPOTrainer over plain trl.GRPOTrainer, measured side by side in one process.

The same small configuration (a randomly initialised Qwen2-architecture model, the same prompts, seeds and
reward) runs through

* `trl`: plain `trl.GRPOTrainer`, fixed group size G;
* `spark-fixed`: `SparkGRPOTrainer` with `min_generations = max_generations = G`, nothing left out of the loss,
  TRL's loss (what the subclass costs when it changes nothing);
* `spark-adaptive`: `SparkGRPOTrainer` with groups of 4 growing to 8 (the study's setting) and constant groups
  left out of the loss (what the feature saves or costs).

The configurations are interleaved over repetitions so that a busy machine slows all of them alike. Per
configuration it prints the median wall time and process CPU time per optimizer step (first step of each run
excluded: warm-up; on a shared machine the CPU time is the reliable one), the
completion tokens generated per step and the peak memory (CUDA: `max_memory_allocated`; CPU: peak resident set
growth during `train()`, sampled every 2 ms, after a discarded warm-up run of each configuration), and the
ratios to `trl`.

    python benchmarks/trainer_overhead_bench.py --steps 6 --reps 3
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or resident-set growth on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak = 0

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            gc.collect()
            self.base = _rss()
            self._stop = False
            self._max = self.base

            def sample():
                while not self._stop:
                    self._max = max(self._max, _rss())
                    time.sleep(0.002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop = True
            self._thread.join()
            self.peak = self._max - self.base


class CpuTimePerStep:
    """Process CPU time of each optimizer step: unlike wall time, hardly affected by other processes competing
    for the cores of a shared machine (run with one thread)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def __init__(self):
                self.times = []

            def on_step_begin(self, args, state, control, **kwargs):
                self._t0 = time.process_time()

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.process_time() - self._t0)

        return _Callback()


class TokenCountingReward:
    """A reward that varies within most groups and is constant for every fourth prompt (as flat MBPP groups
    are), counting the completion tokens it scores."""

    __name__ = "bench_reward"

    def __init__(self):
        self.tokens = 0

    def __call__(self, prompts, completions, completion_ids, task_id, **kwargs):
        self.tokens += sum(len(c) for c in completion_ids)
        return [0.0 if int(t) % 4 == 0 else float(sum(c) % 5) / 4 for t, c in zip(task_id, completion_ids)]


def run(kind: str, model_path: str, opts, out_dir: str):
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from spark_trl import SparkGRPOConfig, SparkGRPOTrainer

    cuda = torch.cuda.is_available() and not opts.cpu
    n_prompts = opts.prompts * (opts.steps + 1)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Write function number {i}."}]
                                            for i in range(n_prompts)], "task_id": [str(i) for i in range(n_prompts)]})
    common = dict(output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                  seed=0, shuffle_dataset=False, per_device_train_batch_size=opts.prompts * 4 // 2,
                  gradient_accumulation_steps=2, max_completion_length=opts.completion_length, max_steps=opts.steps,
                  beta=opts.beta, loss_type="dapo", learning_rate=1e-5, use_cpu=not cuda, bf16=cuda)
    reward = TokenCountingReward()
    g = opts.group_size
    if kind == "trl":
        common["per_device_train_batch_size"] = opts.prompts * g // 2
        args = GRPOConfig(num_generations=g, **common)
        trainer_cls = GRPOTrainer
    elif kind == "spark-fixed":
        common["per_device_train_batch_size"] = opts.prompts * g // 2
        args = SparkGRPOConfig(min_generations=g, max_generations=g, skip_zero_advantage="none", **common)
        trainer_cls = SparkGRPOTrainer
    else:
        args = SparkGRPOConfig(min_generations=4, max_generations=8, generation_increment=2, **common)
        trainer_cls = SparkGRPOTrainer
    cpu_time = CpuTimePerStep()
    trainer = trainer_cls(model=model_path, reward_funcs=reward, args=args, train_dataset=dataset,
                          callbacks=[cpu_time])
    with PeakMemory(cuda) as mem:
        trainer.train()
    times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    result = {"step_times": times[1:], "cpu_times": cpu_time.times[1:],
              "tokens_per_step": reward.tokens / max(len(times), 1), "peak": mem.peak}
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main():
    # glibc adapts its mmap threshold upwards after large frees, after which freed tensors stay resident and the
    # resident-set growth of a later run says little; a fixed threshold returns large blocks to the system.
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--reps", type=int, default=3, help="runs per configuration (interleaved)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    parser.add_argument("--group-size", type=int, default=8, help="G of the fixed-size runs")
    parser.add_argument("--completion-length", type=int, default=48)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.02)
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time ~ work done)")
    opts = parser.parse_args()

    import torch

    torch.set_num_threads(opts.threads)
    import transformers
    import trl

    from spark_trl.testing import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_path = str(build_tiny_model(os.path.join(tmp, "model"), hidden_size=opts.hidden_size,
                                          num_layers=opts.layers))
        kinds = ["trl", "spark-fixed", "spark-adaptive"]
        results = {k: [] for k in kinds}
        # Warm-up: one short run of each, discarded (lazy imports, allocator arenas, kernel caches).
        steps = opts.steps
        opts.steps = 1
        for kind in kinds:
            run(kind, model_path, opts, os.path.join(tmp, f"warmup-{kind}"))
        opts.steps = steps
        for rep in range(opts.reps):
            for kind in kinds:
                r = run(kind, model_path, opts, os.path.join(tmp, f"{kind}-{rep}"))
                results[kind].append(r)
                print(f"rep {rep} {kind:15s} median step {statistics.median(r['step_times']):.3f}s wall, "
                      f"{statistics.median(r['cpu_times']):.3f}s CPU; peak {r['peak'] / 2**20:.1f} MiB", flush=True)

    cuda = torch.cuda.is_available() and not opts.cpu
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{device}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"model: Qwen2 hidden {opts.hidden_size} x {opts.layers} layers (random weights); {opts.prompts} prompts "
          f"per step, G={opts.group_size} (adaptive 4..8), {opts.completion_length} new tokens, beta {opts.beta}, "
          f"{opts.steps} steps x {opts.reps} runs each\n")
    base = None
    print(f"{'configuration':16s} {'wall s/step':>11s} {'ratio':>6s} {'CPU s/step':>10s} {'ratio':>6s} "
          f"{'tokens/step':>11s} {'peak MiB':>9s} {'ratio':>6s}")
    for kind in kinds:
        wall = statistics.median(t for r in results[kind] for t in r["step_times"])
        cpu = statistics.median(t for r in results[kind] for t in r["cpu_times"])
        tokens = statistics.mean(r["tokens_per_step"] for r in results[kind])
        peak = statistics.median(r["peak"] for r in results[kind])
        if base is None:
            base = (wall, cpu, peak)
        print(f"{kind:16s} {wall:11.3f} {wall / base[0]:6.3f} {cpu:10.3f} {cpu / base[1]:6.3f} {tokens:11.0f} "
              f"{peak / 2**20:9.1f} {peak / base[2] if base[2] else float('nan'):6.3f}")


if __name__ == "__main__":
    main()
