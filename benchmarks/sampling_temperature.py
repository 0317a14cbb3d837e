"""How often does a model's sample pass its tests at each sampling temperature? (CPU or GPU, no training.)

The demo's rollout temperature comes from this measurement: a GRPO group learns only from rewards that differ, and
at a temperature where the model rarely passes, most groups hold no success at all.

    python benchmarks/sampling_temperature.py --temperatures 1.0 0.7 0.2 --problems 40 --samples 4

Samples the built-in training problems (default: the first 40) with the evaluation's sampler (transformers
`generate`; --engine spark on a GPU), scores them in the sandbox and prints, per temperature, the pass rate (pass@1
over the samples), the share of samples that do not compile, and the outcome counts.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 0.7, 0.2])
    p.add_argument("--top_p", type=float, default=0.98, help="top_p of the rollouts (the study's 0.98)")
    p.add_argument("--problems", type=int, default=40, help="the first N built-in training problems")
    p.add_argument("--split", default="train", choices=("train", "heldout"))
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--model", default=None, help="default: the converted SmolLM2-135M-Instruct")
    p.add_argument("--engine", default="hf", choices=("hf", "spark"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--out", default=None, help="a JSON file for the results")
    opts = p.parse_args(argv)
    for t in opts.temperatures:
        if t <= 0:
            p.error(f"--temperatures must be > 0 (sampling), got {t}")

    import torch

    from spark_trl.demo import cpu_threads
    from spark_trl.evaluation import EvalConfig, evaluate_problems, isolated_rng
    from spark_trl.models import load_model, load_tokenizer
    from spark_trl.problems import load_builtin
    from spark_trl.sandbox import Executor
    from spark_trl.smollm import smollm2_path

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(cpu_threads(opts.threads))
    path = opts.model or str(smollm2_path())
    tok = load_tokenizer(path)
    model = load_model(path, load_in_4bit=False, dtype="bfloat16" if cuda else "float32")
    problems = load_builtin(opts.split)[:opts.problems]
    results = []
    with Executor(workers=2, timeout=2.0) as executor:
        for t in opts.temperatures:
            config = EvalConfig(n_samples=opts.samples, temperature=t, top_p=opts.top_p,
                                max_new_tokens=opts.max_new_tokens, batch_size=64, timeout=2.0, progress=True,
                                rollout_engine=opts.engine)
            t0 = time.perf_counter()
            with isolated_rng(0), torch.no_grad():
                r = evaluate_problems(model, tok, problems, config, name=f"T{t:g}", executor=executor)
            n = sum(r.status_counts.values())
            row = {"temperature": t, "pass_rate": r.pass_at[1], "syntax_error_share": r.status_counts.get(
                "syntax_error", 0) / n, "no_attempt_share": r.no_attempt_share, "statuses": r.status_counts,
                "samples": n, "seconds": round(time.perf_counter() - t0, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{opts.split} problems 1-{len(problems)}, {opts.samples} samples each, top_p {opts.top_p}, "
          f"{opts.max_new_tokens} tokens\n| temperature | pass rate | do not compile | no attempt |\n|---|---|---|---|")
    for row in results:
        print(f"| {row['temperature']:g} | {row['pass_rate']:.3f} | {row['syntax_error_share']:.3f} | "
              f"{row['no_attempt_share']:.3f} |")
    if opts.out:
        with open(opts.out, "w") as fh:
            json.dump({"settings": vars(opts), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
