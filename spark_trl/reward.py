"""The execution reward: run each completion's program against its problem's tests and score what happened.

A drop-in TRL reward function (``GRPOTrainer(reward_funcs=[ExecutionReward()])``): TRL passes ``prompts``,
``completions``, ``completion_ids`` and every dataset column as keyword arguments; this reads ``tests``,
``test_setup`` and ``entry_point`` (the columns of ``spark_trl.data.to_grpo_dataset``).

Scoring, the SPARK-Code study's rule (penalties and floor are constructor arguments):

    base = passed / total
    all tests pass -> 1.0
    syntax error   -> syntax_penalty                                  (-0.2)
    timeout        -> max(base + timeout_penalty, timeout_penalty)    (-0.3)
    runtime error  -> max(base + runtime_penalty, runtime_penalty)    (-0.1)
    wrong answer   -> max(base, wrong_answer_floor)                   (0.0)

where the class of a failed attempt is that of its first failing test, as the sandbox saw it happen
(``compile()`` failure, the exception that ended the test, the harness's own deadline), never by searching
the error text (the study scored any message containing "timeout" as a timeout).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .outcome import ExecutionOutcome, Status, TestResult
from .sandbox import Executor, Job, get_executor


def _completion_text(completion: Any) -> str | None:
    """A completion as text: a string, or TRL's conversational form (the last assistant message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion:
        last = completion[-1]
        if isinstance(last, dict) and isinstance(last.get("content"), str):
            return last["content"]
    return None


def _column(value, n: int, name: str, default=None) -> list:
    if value is None:
        return [default] * n
    if isinstance(value, str) or (name == "tests" and value and isinstance(value[0], str)):
        return [value] * n  # one value for every completion
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name}: got {len(value)} values for {n} completions")
    return value


class ExecutionReward:
    """Reward = the study's score of running the completion's code against the problem's tests.

    Args:
        syntax_penalty, runtime_penalty, timeout_penalty, wrong_answer_floor: the scoring rule's constants.
        timeout: seconds per test (task 123 of MBPP needs about 4 s of CPU).
        workers: judge processes of a private executor (default: one per CPU).
        executor: an ``Executor`` to share; default: the process-wide ``get_executor()`` (or a private one when
            ``workers``/``timeout`` differ from the defaults).

    After each call ``last_outcomes`` holds one ``ExecutionOutcome`` per completion (the trainer logs them,
    Condition C's recycling reads them).

    Example:
    ```python
    >>> reward = ExecutionReward()
    >>> reward(completions=["```python\\ndef add(a, b):\\n    return a + b\\n```"],
    ...        tests=[["assert add(1, 2) == 3", "assert add(2, 2) == 4"]])
    [1.0]
    ```
    """

    __name__ = "execution_reward"
    # Dataset columns it cannot do without (SparkGRPOTrainer checks them at construction); `test_setup` and
    # `entry_point` are read when present.
    required_columns = ("tests",)

    def __init__(self, syntax_penalty: float = -0.2, runtime_penalty: float = -0.1, timeout_penalty: float = -0.3,
                 wrong_answer_floor: float = 0.0, timeout: float = 10.0, workers: int | None = None,
                 executor: Executor | None = None):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.syntax_penalty = float(syntax_penalty)
        self.runtime_penalty = float(runtime_penalty)
        self.timeout_penalty = float(timeout_penalty)
        self.wrong_answer_floor = float(wrong_answer_floor)
        self.timeout = float(timeout)
        self.workers = workers
        self._executor = executor
        self._own_executor = False
        self.last_outcomes: list[ExecutionOutcome] = []

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            if self.workers is None:
                self._executor = get_executor()
            else:
                self._executor = Executor(workers=self.workers, timeout=self.timeout)
                self._own_executor = True
        return self._executor

    def close(self) -> None:
        """Close a private executor (the shared one closes at exit)."""
        if self._own_executor and self._executor is not None:
            self._executor.close()
            self._executor = None

    # ------------------------------------------------------------------------------------ scoring
    def score(self, outcome: ExecutionOutcome) -> float:
        """The study's scalar for one outcome."""
        status = outcome.status
        if status is Status.PASSED:
            return 1.0
        if status is Status.SYNTAX_ERROR:
            return self.syntax_penalty
        base = outcome.passed / outcome.total if outcome.total else 0.0
        if status is Status.TIMEOUT:
            return max(base + self.timeout_penalty, self.timeout_penalty)
        if status is Status.RUNTIME_ERROR:
            return max(base + self.runtime_penalty, self.runtime_penalty)
        return max(base, self.wrong_answer_floor)

    # ------------------------------------------------------------------------------------ running
    def run(self, completions: Sequence[Any], tests: Sequence[Sequence[str]], test_setup=None, entry_point=None,
            task_id=None) -> list[ExecutionOutcome]:
        """Execute every completion against its tests; no scoring. Dataset faults (no tests, a test that does
        not compile) raise ValueError naming the task before anything runs."""
        n = len(completions)
        tests = _column(tests, n, "tests")
        setups = _column(test_setup, n, "test_setup", "")
        entries = _column(entry_point, n, "entry_point", "")
        task_ids = _column(task_id, n, "task_id", "")
        names = [str(task_ids[i] or f"completion {i}") for i in range(n)]
        for i in range(n):
            if tests[i] is None or isinstance(tests[i], str) or len(tests[i]) == 0:
                raise ValueError(f"{names[i]}: no tests (tests must be a non-empty list of test snippets)")
        executor = self.executor
        # Dataset faults (a test or setup that does not compile) before anything runs, for every row.
        executor.validate([Job("", list(tests[i]), setups[i] or "", task_id=names[i]) for i in range(n)])
        jobs, slots, outcomes = [], [], [None] * n
        for i, completion in enumerate(completions):
            name, t = names[i], tests[i]
            text = _completion_text(completion)
            if text is None:  # the model produced no text: its problem, scored as a syntax error
                outcomes[i] = ExecutionOutcome(
                    status=Status.SYNTAX_ERROR, code="",
                    tests=[TestResult(Status.SYNTAX_ERROR, error_type="TypeError",
                                      error_tail=f"completion is a {type(completion).__name__}, not text")] * len(t),
                    error_tail=f"completion is a {type(completion).__name__}, not text")
                continue
            # The judge extracts the program (off this thread, under the job's deadline): no completion can
            # make this call raise or stall.
            jobs.append(Job(code=text, tests=list(t), setup=setups[i] or "", timeout=self.timeout, task_id=name,
                            entry_point=entries[i] or "", extract=True))
            slots.append(i)
        for i, outcome in zip(slots, executor.run(jobs) if jobs else []):
            outcomes[i] = outcome
        return outcomes

    def __call__(self, prompts=None, completions=None, completion_ids=None, *, tests=None, test_setup=None,
                 entry_point=None, log_metric: Callable[[str, float], None] | None = None,
                 log_extra: Callable[[str, list], None] | None = None, **kwargs) -> list[float]:
        if completions is None:
            raise ValueError("execution_reward needs `completions`")
        if tests is None:
            raise ValueError("execution_reward needs a `tests` column (list of test snippets per row)")
        outcomes = self.run(completions, tests, test_setup, entry_point, kwargs.get("task_id"))
        self.last_outcomes = outcomes
        rewards = [self.score(o) for o in outcomes]
        if log_metric is not None and outcomes:
            n = len(outcomes)
            for status in Status:
                log_metric(f"execution/{status.value}", sum(o.status is status for o in outcomes) / n)
            log_metric("execution/tests_passed", sum(o.passed / max(o.total, 1) for o in outcomes) / n)
            log_metric("execution/test_timeouts",
                       sum(t.status is Status.TIMEOUT for o in outcomes for t in o.tests) / n)
        if log_extra is not None:
            log_extra("execution_status", [o.status.value for o in outcomes])
        return rewards
