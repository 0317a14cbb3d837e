"""Where an optimizer step's time goes: generation, rewards, no-grad log-prob forwards, the loss forward, the
backward, the optimizer, and the rest.

Works on `trl.GRPOTrainer` and `SparkGRPOTrainer` alike, so a plain TRL run and a spark-trl run are split the
same way (benchmarks/gpu_train_bench.py reports both). Each phase is timed by wrapping, on the trainer instance
only, the one call that does it:

    generate        TRL's generation (`_generate_single_turn`) or the fast engine's `generate`
    reward          TRL's `_calculate_rewards` (every reward function, sandbox included)
    logps_no_grad   per-token log-prob forwards without gradient: reference and old log-probs
    loss_forward    per-token log-prob forwards with gradient: the policy forward of the loss
    backward        `accelerator.backward`
    optimizer       from `on_pre_optimizer_step` to `on_optimizer_step` (the optimizer's step)
    other           the step's wall time minus all of the above (padding, batching, metrics, host syncs)

On a GPU each timed call is bracketed by `torch.cuda.synchronize()` (``sync=True``), so that queued kernels are
charged to the phase that launched them; this removes the overlap of host and device work that an unprofiled
step has, so a profiled step can be slightly slower. Each step's figures go into TRL's metrics (`time/<phase>`
seconds, averaged at the next log: TensorBoard, W&B, `state.log_history`) and into `steps`.

Example:
```python
>>> from spark_trl.profiling import StepProfiler
>>> profiler = StepProfiler().attach(trainer)
>>> trainer.train()
>>> print(profiler.table())   # seconds per step, mean over the steps after the first
```
"""

from __future__ import annotations

import functools
import time

import torch
from transformers import TrainerCallback

from . import trl_private

PHASES = ("generate", "reward", "logps_no_grad", "loss_forward", "backward", "optimizer")


class StepProfiler(TrainerCallback):
    """Seconds per phase of every optimizer step; see the module docstring."""

    def __init__(self, sync: bool = True):
        self.sync = sync and torch.cuda.is_available()
        self.steps: list[dict[str, float]] = []  # one dict per optimizer step: PHASES, "other", "total"
        self._current = dict.fromkeys(PHASES, 0.0)
        self._step_start: float | None = None
        self._optimizer_start: float | None = None
        self._trainer = None

    # ------------------------------------------------------------------------------------------ wiring
    def attach(self, trainer) -> "StepProfiler":
        """Wrap the trainer's timed calls (this instance only) and register as its callback."""
        if self._trainer is not None:
            raise RuntimeError("this StepProfiler is already attached to a trainer")
        self._trainer = trainer
        trl_private.wrap_method(trainer, trl_private.GENERATION_METHOD, lambda f: self._timed(f, "generate"))
        trl_private.wrap_method(trainer, trl_private.REWARD_METHOD, lambda f: self._timed(f, "reward"))
        trl_private.wrap_method(trainer, trl_private.LOGPS_METHOD, self._timed_logps)
        engine = getattr(trainer, "rollout_engine", None)  # SparkGRPOTrainer's fast engine, when it has one
        if engine is not None:
            engine.generate = self._timed(engine.generate, "generate")
        trainer.accelerator.backward = self._timed(trainer.accelerator.backward, "backward")
        trainer.add_callback(self)
        return self

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _timed(self, fn, phase):
        """`fn`, its time charged to `phase` (a name, or a function of nothing that names it at call time)."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = phase() if callable(phase) else phase
            t0 = self._now()
            try:
                return fn(*args, **kwargs)
            finally:
                self._current[name] += self._now() - t0
        return timed

    def _timed_logps(self, fn):
        # One method serves both: the loss's forward runs with gradient, reference/old log-probs without.
        return self._timed(fn, lambda: "loss_forward" if torch.is_grad_enabled() else "logps_no_grad")

    # ------------------------------------------------------------------------------------------ callbacks
    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = self._now()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._optimizer_start = self._now()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._optimizer_start is not None:
            self._current["optimizer"] += self._now() - self._optimizer_start
            self._optimizer_start = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is None:
            return
        total = self._now() - self._step_start
        step = {**self._current, "total": total}
        step["other"] = max(0.0, total - sum(self._current[p] for p in PHASES))
        self.steps.append(step)
        self._current = dict.fromkeys(PHASES, 0.0)
        self._step_start = None
        if self._trainer is not None:
            metrics = trl_private.metrics(self._trainer, "train")
            for name in (*PHASES, "other", "total"):
                metrics[f"time/{name}"].append(step[name])

    # ------------------------------------------------------------------------------------------ results
    def summary(self, skip_first: bool = True) -> dict[str, float]:
        """Mean seconds per step of each phase, "other" and "total" (without the first step, which compiles and
        warms up, when there are later ones)."""
        steps = self.steps[1:] if skip_first and len(self.steps) > 1 else self.steps
        if not steps:
            return {}
        return {k: sum(s[k] for s in steps) / len(steps) for k in (*PHASES, "other", "total")}

    def table(self, skip_first: bool = True) -> str:
        """The summary as a markdown table: seconds per step and share of the step."""
        mean = self.summary(skip_first)
        if not mean:
            return "(no optimizer step profiled)"
        total = mean["total"] or 1e-12
        lines = ["| phase | s/step | share |", "|---|---|---|"]
        lines += [f"| {k} | {mean[k]:.3f} | {100 * mean[k] / total:.0f} % |" for k in (*PHASES, "other")]
        lines.append(f"| **total** | {mean['total']:.3f} | 100 % |")
        return "\n".join(lines)
