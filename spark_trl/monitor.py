"""Collapse detection: warn when the reward rises while the model gets worse at the task.

GRPO maximises the reward, not the pass rate. When the two part ways, the policy is learning something the
reward pays for that is not solving problems. The case seen in practice: under the study's scoring a program
that does nothing (a docstring, ``pass``) scores 0, above an attempt that raises (-0.1) or is cut by the token
limit (-0.2), and a weak model learns to give up (SmolLM2-135M on the GPU learning benchmark:
one seed's held-out pass@1 0.385 -> 0.003, 98 % of its samples stubs, docs/benchmarks.md "Learning").

``CollapseMonitor`` watches two time scales and warns once (``logging`` and ``warnings``), naming the cause
and the remedy:

* steps: over a trailing window of logged steps, the second half's mean reward is above the first half's while
  its train pass rate is below it, both by more than noise (``min_reward_rise``, ``min_pass_drop``); or the
  no-attempt share of the second half reaches ``max_no_attempt``;
* iterations (``check_iterations``, called by the study runner with its results rows): the reward rose while the
  train pass rate or the held-out pass@1 fell, ``patience`` iterations in a row; or the no-attempt share of the
  training rollouts or of an evaluation set reaches ``max_no_attempt`` (the collapse measured under the study's
  scoring: held-out no-attempt share 0.98 at iteration 3 while the mean reward barely moved).

It also warns once when the loss, KL or gradient norm stops being finite (the weights diverged).

SparkGRPOTrainer adds one by default (``SparkGRPOConfig.collapse_window``); plain TRL users can add it as any
callback: ``GRPOTrainer(..., callbacks=[CollapseMonitor()])`` (it reads TRL's ``reward`` and the reward's
``execution/passed`` / ``execution/no_attempt`` logs).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Sequence

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Log keys, first found wins: SparkGRPOTrainer's own, then what ExecutionReward logs under plain TRL.
PASS_KEYS = ("spark/train_pass_rate", "execution/passed")
NO_ATTEMPT_KEYS = ("spark/no_attempt_share", "execution/no_attempt")


class CollapseWarning(UserWarning):
    """The reward rose while the pass rate fell: the policy is gaming the reward."""


def _first(logs: dict, keys: Sequence[str]) -> float | None:
    """The first of ``keys`` logged with a finite number."""
    return next((v for v in (_num(logs.get(k)) for k in keys) if v is not None), None)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


class CollapseMonitor(TrainerCallback):
    """Warns once when the reward and the pass rate part ways (see the module docstring).

    Args:
        window: logged steps compared (first half against second half); 0 turns the step check off.
        patience: consecutive iterations of rising reward and falling pass rate before the iteration check fires.
        min_reward_rise, min_pass_drop: what the step check counts as a change rather than noise (absolute; the
            pass-rate drop must also be a quarter of its earlier value).
        max_no_attempt: a no-attempt share that warns by itself (the model mostly stopped trying).
        train_drop, eval_drop: the relative falls of the train pass rate and of the held-out pass@1 from one
            iteration to the next that the iteration check counts.
        reward_mode: the execution reward's mode, to name the likely cause (``"study"``: its penalties).

    Example:
    ```python
    >>> monitor = CollapseMonitor(window=4)
    >>> for reward, passed in [(-0.10, 0.04), (-0.09, 0.05), (-0.05, 0.01), (-0.04, 0.0)]:
    ...     monitor.observe({"reward": reward, "spark/train_pass_rate": passed})
    >>> monitor.fired
    True
    ```
    """

    def __init__(self, window: int = 16, patience: int = 2, min_reward_rise: float = 0.02,
                 min_pass_drop: float = 0.01, max_no_attempt: float = 0.5, train_drop: float = 0.1,
                 eval_drop: float = 0.2, reward_mode: str | None = None):
        if window < 0 or window % 2:
            raise ValueError(f"window must be an even number of logged steps >= 0, got {window}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.window, self.patience = window, patience
        self.min_reward_rise, self.min_pass_drop, self.max_no_attempt = min_reward_rise, min_pass_drop, max_no_attempt
        self.train_drop, self.eval_drop = train_drop, eval_drop
        self.reward_mode = reward_mode
        self.history: list[tuple[float, float, float | None]] = []  # (reward, pass rate, no-attempt share)
        self.fired = False
        self.message: str | None = None
        self._taken = False
        self.diverged = False
        self.divergence_message: str | None = None

    # ------------------------------------------------------------------------------------------ steps
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.observe(logs, step=getattr(state, "global_step", None))

    def observe(self, logs: dict, step: int | None = None) -> None:
        """One logged step's metrics; checks the trailing window."""
        self._check_finite(logs, step)
        reward, passed = _first(logs, ("reward",)), _first(logs, PASS_KEYS)
        if reward is None or passed is None:
            return  # not a training log (evaluation, epoch summary)
        self.history.append((reward, passed, _first(logs, NO_ATTEMPT_KEYS)))
        if self.fired or not self.window or len(self.history) < self.window:
            return
        recent = self.history[-self.window:]
        half = self.window // 2
        before, after = recent[:half], recent[half:]
        r0, r1 = _mean([h[0] for h in before]), _mean([h[0] for h in after])
        p0, p1 = _mean([h[1] for h in before]), _mean([h[1] for h in after])
        na = [h[2] for h in after if h[2] is not None]
        na1 = _mean(na) if na else None
        where = f"the last {self.window} logged steps" + (f" (to step {step})" if step is not None else "")
        if r1 - r0 >= self.min_reward_rise and p0 - p1 >= max(self.min_pass_drop, 0.25 * p0):
            self._warn(where, r0, r1, p0, p1, na1)
        elif na1 is not None and na1 >= self.max_no_attempt:
            self._warn(where, r0, r1, p0, p1, na1, stopped_trying=True)

    # ------------------------------------------------------------------------------------------ iterations
    def check_iterations(self, rows: Sequence[dict], eval_key: str | None = None) -> bool:
        """The study runner's rows (iteration >= 1 carry ``reward`` and ``train_pass_rate``): fires when the reward
        rose while the train pass rate fell (by ``train_drop`` of its value) or ``eval_key`` (a held-out pass@1)
        fell (by ``eval_drop``: held-out scores of a small set wander by a few percent on a plateau),
        ``patience`` times in a row. Returns whether it fired now."""
        if self.fired:
            return False
        rows = sorted(rows, key=lambda r: r["iteration"])
        last = rows[-1] if rows else {}
        shares = {k: _num(v) for k, v in last.items() if (k == "no_attempt" or k.endswith("/no_attempt"))
                  and _num(v) is not None}
        if last.get("iteration", 0) >= 1 and shares and max(shares.values()) >= self.max_no_attempt:
            key = max(shares, key=shares.get)
            self._warn(f"iteration {last['iteration']}", None, last.get("reward"), None,
                       last.get(eval_key or "train_pass_rate"), shares[key], stopped_trying=True,
                       pass_name=eval_key or "train pass rate", na_name=key)
            return True
        streak, first = 0, None
        for prev, cur in zip(rows, rows[1:]):
            rose = _num(cur.get("reward")) is not None and _num(prev.get("reward")) is not None \
                and cur["reward"] > prev["reward"]
            fell = _fell(prev, cur, "train_pass_rate", self.train_drop) or \
                bool(eval_key and _fell(prev, cur, eval_key, self.eval_drop))
            streak = streak + 1 if rose and fell else 0
            first = prev if streak == 1 else first
            if streak >= self.patience:
                key = eval_key if eval_key and _num(cur.get(eval_key)) is not None else "train_pass_rate"
                self._warn(f"iterations {first['iteration']}-{cur['iteration']}", first["reward"], cur["reward"],
                           first.get(key), cur.get(key), cur.get("no_attempt"), pass_name=key)
                return True
        return False

    # ------------------------------------------------------------------------------------------ the warning
    def _warn(self, where, r0, r1, p0, p1, no_attempt, stopped_trying=False, pass_name="train pass rate",
              na_name="no-attempt share"):
        self.fired = True
        if r0 is None:
            facts = f"mean reward {_f(r1)}, {pass_name} {_f(p1)}"
        else:
            facts = f"mean reward {_f(r0)} -> {_f(r1)}, {pass_name} {_f(p0)} -> {_f(p1)}"
        if no_attempt is not None:
            facts += f", {na_name} {_f(no_attempt)}"
        what = ("most completions make no attempt at the task" if stopped_trying
                else "the reward rose while the pass rate fell")
        if self.reward_mode == "study":
            cause = ("Likely cause: the study's scoring pays a do-nothing program (0) more than a failed attempt "
                     "(-0.1 runtime error, -0.2 syntax error or truncation), so a model that rarely passes learns "
                     "to give up. Remedy: reward_mode='progress' (ExecutionReward(mode='progress')) or 'binary'; "
                     "a larger max_completion_length if many completions are cut.")
        else:
            cause = ("The policy is learning something the reward pays for other than passing tests. Remedy: "
                     "inspect the completions (no-attempt share, statuses), use a reward that pays only for "
                     "tests a do-nothing program fails (ExecutionReward(mode='progress') or 'binary'), lower the "
                     "learning rate or raise the KL coefficient (beta).")
        self.message = f"Training may be collapsing over {where}: {what} ({facts}). {cause}"
        logger.warning(self.message)
        warnings.warn(self.message, CollapseWarning, stacklevel=2)

    def restore(self, message: str) -> None:
        """A resumed run whose rows already carry the warning: it was given, and is not given again."""
        self.fired, self._taken, self.message = True, True, message

    def take_message(self) -> str | None:
        """The warning once, for whoever records it (the study runner puts it in the iteration's row)."""
        if self.fired and not self._taken:
            self._taken = True
            return self.message
        return None

    # ------------------------------------------------------------------------------------------ divergence
    def _check_finite(self, logs: dict, step: int | None) -> None:
        """A NaN or infinite loss, KL or gradient norm: the weights are (or are about to be) broken, and every
        later completion is noise. Seen with SmolLM2 at lr 5e-5 and fixed groups of 8 (docs/benchmarks.md)."""
        if self.diverged:
            return
        bad = [k for k in ("loss", "kl", "grad_norm") if k in logs and _is_nonfinite(logs[k])]
        if bad:
            self.diverged = True
            self.divergence_message = (
                f"Training diverged at step {step}: {', '.join(bad)} not finite. The policy's weights are likely "
                "NaN and every later completion is noise. Remedy: resume from the last checkpoint with a lower "
                "learning_rate, a larger beta or a smaller max_grad_norm.")
            logger.warning(self.divergence_message)
            warnings.warn(self.divergence_message, CollapseWarning, stacklevel=2)


def _fell(prev: dict, cur: dict, key: str, relative: float) -> bool:
    a, b = _num(prev.get(key)), _num(cur.get(key))
    return a is not None and b is not None and b < a * (1 - relative)


def _is_nonfinite(value) -> bool:
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _num(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _f(value) -> str:
    v = _num(value)
    return "n/a" if v is None else f"{v:.3f}"
