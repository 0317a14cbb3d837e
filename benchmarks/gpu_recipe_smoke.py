"""A study recipe end to end on one GPU, small: the runner's GPU path (rollout_engine='auto' -> the fast engine, the
evaluation borrowing the trainer's engine, checkpoints, results) on the 3B-shaped random model.

    python benchmarks/gpu_recipe_smoke.py --model_dir runs/bench/qwen25-3b-shaped --out runs/bench/recipe-smoke

``--model_dir``: any causal LM folder; runs/bench/qwen25-3b-shaped is the 3B-shaped random model that
``gpu_rollout_bench.py`` and ``gpu_train_bench.py`` build on their first run.

Prints the results rows, which backend each part used and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--humaneval", default=None)
    p.add_argument("--tokens", type=int, default=128)
    opts = p.parse_args(argv)
    import torch

    import spark_trl.rollout as rollout
    from spark_trl.runner import RECIPES, parse_recipe, run_study

    built, borrowed = [], []
    init, sampling = rollout.FastRolloutEngine.__init__, rollout.FastRolloutEngine.sampling

    def counting_init(self, *a, **k):
        built.append(self)
        init(self, *a, **k)

    def counting_sampling(self, args, **k):
        borrowed.append(args.temperature)
        return sampling(self, args, **k)

    rollout.FastRolloutEngine.__init__ = counting_init
    rollout.FastRolloutEngine.sampling = counting_sampling
    argv = ["--model_name_or_path", opts.model_dir, "--output_dir", opts.out, "--overwrite", "true",
            "--max_train_problems", "8", "--iterations", "1", "--eval_limit", "16",
            "--max_completion_length", str(opts.tokens), "--eval_max_new_tokens", str(opts.tokens),
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--logging_steps", "1",
            "--disable_tqdm", "true"]
    if opts.humaneval:
        argv += ["--humaneval_path", opts.humaneval]
    study, targs, margs = parse_recipe(RECIPES["condition_a_v2"], argv)
    print("rollout_engine", targs.rollout_engine, "eval_rollout_engine", study.eval_rollout_engine, flush=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:  # CPU smoke run of the script itself
        argv += ["--use_cpu", "true", "--load_in_4bit", "false", "--dtype", "float32", "--gradient_checkpointing",
                 "false"]
        study, targs, margs = parse_recipe(RECIPES["condition_a_v2"], argv)
    t0 = time.perf_counter()
    result = run_study(study, targs, margs, progress=False)
    rows = [json.loads(x) for x in open(os.path.join(opts.out, "results.jsonl"))]
    report = {"status": result["status"], "seconds": round(time.perf_counter() - t0, 1),
              "engines_built": len(built), "engine_active": bool(built) and built[0].active,
              "evaluations_on_the_trainers_engine": len(borrowed), "eval_temperatures": sorted(set(borrowed)),
              "engine_stats": built[0].stats if built else None,
              "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
              "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
              "rows": rows}
    print("RECIPE_SMOKE", json.dumps(report, default=str), flush=True)
    return 0 if result["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
