"""The execution reward: run each completion's program against its problem's tests and score what happened.

A drop-in TRL reward function (``GRPOTrainer(reward_funcs=[ExecutionReward()])``): TRL passes ``prompts``,
``completions``, ``completion_ids`` and every dataset column as keyword arguments; this reads ``tests``,
``test_setup`` and ``entry_point`` (the columns of ``spark_trl.data.to_grpo_dataset``).

Three scoring modes (``mode=``), because what a reward pays for is what GRPO teaches:

``"progress"`` (the default): pays only for real progress.

    all tests pass -> 1.0
    otherwise      -> (tests passed that no do-nothing program passes) / (all tests)      (never below 0)

    A do-nothing program is a stub of the entry point that returns a constant (None, 0, 1, True, False, "",
    [], {}) or its first argument; which tests some stub passes is measured once per problem, in the sandbox.
    Syntax errors, runtime errors and timeouts score what their passed tests earn, at least 0: failing while
    trying is never worse than not trying, and not trying earns exactly 0.

``"binary"``: 1.0 when every test passes, else 0.0 (the sparsest signal; nothing to game but the tests).

``"study"``: the SPARK-Code study's rule, for the five study recipes that reproduce it:

    base = passed / total
    all tests pass -> 1.0
    syntax error   -> syntax_penalty                                  (-0.2)
    timeout        -> max(base + timeout_penalty, timeout_penalty)    (-0.3)
    runtime error  -> max(base + runtime_penalty, runtime_penalty)    (-0.1)
    wrong answer   -> max(base, wrong_answer_floor)                   (0.0)

    Why it is not the default: a program that does nothing (a docstring, ``pass``) scores 0, above an attempt
    that raises (-0.1) or is cut by the token limit (a syntax error, -0.2). For a model that rarely passes, giving
    up is the best policy and GRPO finds it: on the GPU learning benchmark one SmolLM2-135M seed went from held-out
    pass@1 0.385 to 0.003, 98 % of its samples stubs (docs/benchmarks.md, "Learning").

When a completion's tests stop (``Job.stop_after``; a job's tests run one after another, and a test that times out
costs the whole per-test ``timeout``, so an endless loop used to cost n_tests x timeout and held the whole GRPO
step: 30 s for 3 MBPP tests x 10 s, on a step of ~4 s):

    binary   -> "failure": the first test that does not pass ends the job. Exact: any failure scores 0.
    progress -> "timeout": the first test that times out ends the job; the rest count as not passed.
                An approximation: a program that exceeds the limit on one test is scored as timing out on the
                rest too, losing the partial credit of later tests it would have passed. That is rare (a program
                that loops on one input mostly loops on the others) and the trade is one timeout per completion
                instead of n_tests of them; wrong answers and errors do not stop it, so partial credit is
                otherwise exact. ``stop_after="never"`` restores the exact score.
    study    -> "never": every test runs, as the study ran every assert (its score counts passed tests after a
                timeout); the recipes reproduce it.

The do-nothing stubs of progress mode always run every test (their per-test results are what they measure; they
are fast, and run under min(timeout, 2 s)).

The class of a failed attempt is that of its first failing test, as the sandbox saw it happen (``compile()``
failure, the exception that ended the test, the harness's own deadline), never by searching the error text.

Every outcome is also marked ``no_attempt`` (see ``is_no_attempt``): the program defines no entry point, or
its body only returns a constant / raises NotImplementedError / is a docstring or ``pass``. The reward logs that
share (``execution/no_attempt``) and the trainer warns when the pass rate falls while the reward rises.
"""

from __future__ import annotations

import ast
import builtins
import re
import threading
from typing import Any, Callable, Sequence

from .outcome import ExecutionOutcome, Status, TestResult
from .sandbox import Executor, Job, get_executor
from .sandbox.executor import STOP_AFTER
from .sandbox.names import free_globals, is_stdlib_module, stored_names

REWARD_MODES = ("progress", "binary", "study")
# When each mode stops running a completion's tests (the module docstring says why).
MODE_STOP_AFTER = {"progress": "timeout", "binary": "failure", "study": "never"}
STUDY_PENALTIES = dict(syntax_penalty=-0.2, runtime_penalty=-0.1, timeout_penalty=-0.3, wrong_answer_floor=0.0)

# What the do-nothing stubs return: the constants a policy could answer without reading its input, and the
# input itself. A test one of them passes (``assert f([]) == []``, ``assert is_prime(4) == False``) says
# nothing about a program that passes it too.
_TRIVIAL_RETURNS = ("None", "0", "1", "True", "False", "''", "[]", "{}", "args[0] if args else None")
_MAX_ANALYSED_CHARS = 100_000  # a longer program is not analysed for no-attempt (it is an attempt, of a kind)
_BUILTIN_NAMES = frozenset(dir(builtins))


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


# ------------------------------------------------------------------------------------------ no attempt


def _is_trivial_statement(node: ast.stmt) -> bool:
    if isinstance(node, ast.Pass):
        return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # docstring, `...`, a bare literal
        return True
    if isinstance(node, ast.Return):
        if node.value is None:
            return True
        try:
            ast.literal_eval(node.value)  # a constant: None, 0, "", [], (1, 2), {}
            return True
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return False
    if isinstance(node, ast.Raise):
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _trivial_body(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return all(_is_trivial_statement(stmt) for stmt in func.body)


def is_no_attempt(code: str, entry_point: str | None = None) -> bool:
    """Whether a program makes no attempt at its problem: it is empty, or defines no ``entry_point`` (no def,
    class or assignment of that name), or the entry point's body only holds a docstring, ``pass``, ``...``, a
    ``return`` of a constant or ``raise NotImplementedError``. Without an entry point: every top-level function
    is of that kind (or there is none). A program that does not compile is an attempt that failed (unless it
    never names the entry point: prose, a refusal).

    Judged on the program's structure rather than its score: a wrong answer and a stub both fail every test,
    but only one of them tried.

    Example:
    ```python
    >>> is_no_attempt('def add(a, b):\\n    \"\"\"Add two numbers.\"\"\"', "add")
    True
    >>> is_no_attempt("def add(a, b):\\n    return 0", "add")
    True
    >>> is_no_attempt("def add(a, b):\\n    return a - b", "add")
    False
    >>> is_no_attempt("def add(a, b):\\n    return a +", "add")   # a syntax error is a failed attempt
    False
    ```
    """
    if not isinstance(code, str) or len(code) > _MAX_ANALYSED_CHARS:
        return False
    if not code.strip():
        return True
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        # A program that does not compile tried, unless it never even names what it was asked for (prose only).
        if entry_point:
            return re.search(rf"\b{re.escape(entry_point)}\b", code) is None
        return re.search(r"\b(?:def|lambda)\b", code) is None
    funcs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if entry_point:
        bound = sorted((n for n in _module_level(tree) if _binds(n, entry_point)),
                       key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
        if not bound:
            return True
        last = bound[-1]  # the definition in force when the tests run: the last in the source
        return isinstance(last, (ast.FunctionDef, ast.AsyncFunctionDef)) and _trivial_body(last)
    return all(_trivial_body(f) for f in funcs) and not any(
        isinstance(n, (ast.ClassDef, ast.Assign, ast.AnnAssign, ast.For, ast.While, ast.If)) for n in tree.body)


def _module_level(tree: ast.Module):
    """The module's nodes, not looking inside function, lambda or class bodies (their names are local)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _binds(node: ast.AST, name: str) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, (ast.Name,)):
        return node.id == name and isinstance(node.ctx, ast.Store)
    if isinstance(node, ast.alias):
        return (node.asname or node.name.split(".")[0]) == name
    return False


# ------------------------------------------------------------------------------------------ do-nothing stubs


def _called_names(tests: Sequence[str], setup: str) -> list[str]:
    """What a program must define for the tests: their free names that neither the builtins, the standard library
    nor the setup provide (the judge binds names in that order: spark_trl.sandbox.names)."""
    try:
        provided = stored_names(compile(setup or "", "<setup>", "exec", dont_inherit=True))
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        provided = set()
    names: list[str] = []
    for test in tests:
        try:
            free = free_globals(compile(test, "<test>", "exec", dont_inherit=True))
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            continue
        names += sorted(n for n in free if n not in _BUILTIN_NAMES and n not in provided
                        and not is_stdlib_module(n) and n not in names)
    return names


def do_nothing_programs(tests: Sequence[str], setup: str = "", entry_point: str | None = None) -> list[str]:
    """The stubs whose test results define a problem's uninformative tests: the entry point (or, without one,
    every function the tests call) returning each trivial value.

    Example:
    ```python
    >>> print(do_nothing_programs(["assert add(1, 2) == 3"], entry_point="add")[0])
    def add(*args, **kwargs):
        return None
    ```
    """
    names = [entry_point] if entry_point else _called_names(tests, setup)
    if not names:
        return []
    return ["\n\n".join(f"def {name}(*args, **kwargs):\n    return {value}" for name in names)
            for value in _TRIVIAL_RETURNS]


# ------------------------------------------------------------------------------------------ the reward


DEFAULT_TIMEOUT = 10.0  # seconds per test: the study's limit (MBPP's task 123 needs about 4 s of CPU)


class ExecutionReward:
    """Reward = the score of running the completion's code against the problem's tests.

    Args:
        mode: ``"progress"`` (default: credit only for tests no do-nothing program passes, never below 0),
            ``"binary"`` (all tests pass or nothing) or ``"study"`` (the SPARK-Code study's rule with its
            penalties). The module docstring says what each pays for and why.
        syntax_penalty, runtime_penalty, timeout_penalty, wrong_answer_floor: the study rule's constants
            (default: the study's -0.2, -0.1, -0.3, 0.0); only ``mode="study"`` takes them.
        timeout: seconds per test (task 123 of MBPP needs about 4 s of CPU); default: ``executor``'s timeout
            when one is given, else 10 s (the study's).
        workers: judge processes of a private executor (default: one per CPU).
        executor: an ``Executor`` to share; default: the process-wide ``get_executor()`` (or a private one when
            ``workers``/``timeout`` differ from the defaults).
        stop_after: when a completion's remaining tests are skipped (``Job.stop_after``): default the mode's rule,
            ``"failure"`` for binary (exact), ``"timeout"`` for progress (an approximation, see the module
            docstring), ``"never"`` for study.

    After each call ``last_outcomes`` holds one ``ExecutionOutcome`` per completion (the trainer logs them,
    Condition C's recycling reads them), each marked ``no_attempt``.

    Example:
    ```python
    >>> reward = ExecutionReward()
    >>> reward(completions=["```python\\ndef add(a, b):\\n    return a + b\\n```",
    ...                     "```python\\ndef add(a, b):\\n    return a * b\\n```",
    ...                     "```python\\ndef add(a, b):\\n    \\"\\"\\"Add.\\"\\"\\"\\n```"],
    ...        tests=["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"],
    ...        entry_point="add")  # one problem's tests, for every completion
    [1.0, 0.3333333333333333, 0.0]
    >>> ExecutionReward(mode="study")(completions=["def add(a, b):\\n    return a +"],
    ...                               tests=[["assert add(1, 2) == 3"]])
    [-0.2]
    ```

    (In the first call, ``a * b`` passes ``add(2, 2) == 4``, which no stub passes: 1 of 3 tests earned. It also
    passes ``add(0, 0) == 0``, which ``return 0`` passes too: no credit for that one.)
    """

    __name__ = "execution_reward"
    # Dataset columns it cannot do without (SparkGRPOTrainer checks them at construction); `test_setup` and
    # `entry_point` are read when present.
    required_columns = ("tests",)

    def __init__(self, mode: str = "progress", syntax_penalty: float | None = None,
                 runtime_penalty: float | None = None, timeout_penalty: float | None = None,
                 wrong_answer_floor: float | None = None, timeout: float | None = None, workers: int | None = None,
                 executor: Executor | None = None, stop_after: str | None = None):
        if mode not in REWARD_MODES:
            raise ValueError(f"mode must be one of {', '.join(REWARD_MODES)}; got {mode!r}")
        if stop_after is None:
            stop_after = MODE_STOP_AFTER[mode]
        if stop_after not in STOP_AFTER:
            raise ValueError(f"stop_after must be one of {', '.join(STOP_AFTER)}; got {stop_after!r}")
        given = {k: v for k, v in dict(syntax_penalty=syntax_penalty, runtime_penalty=runtime_penalty,
                                       timeout_penalty=timeout_penalty,
                                       wrong_answer_floor=wrong_answer_floor).items() if v is not None}
        if mode != "study" and any(float(v) != STUDY_PENALTIES[k] and float(v) != 0.0 for k, v in given.items()):
            raise ValueError(f"mode={mode!r} takes no penalties (they make doing nothing pay better than a failed "
                             f"attempt); got {', '.join(given)}. Use mode='study' for the study's rule.")
        if timeout is None:
            # A shared executor's own per-test timeout holds unless one is given here: a benchmark that built its
            # executor with timeout=2 and got 10 s per looping test lost 30 s per step to one endless loop.
            timeout = executor.timeout if executor is not None else DEFAULT_TIMEOUT
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.mode = mode
        self.stop_after = stop_after
        values = {**STUDY_PENALTIES, **given}
        self.syntax_penalty = float(values["syntax_penalty"])
        self.runtime_penalty = float(values["runtime_penalty"])
        self.timeout_penalty = float(values["timeout_penalty"])
        self.wrong_answer_floor = float(values["wrong_answer_floor"])
        self.timeout = float(timeout)
        self.workers = workers
        self._executor = executor
        self._own_executor = False
        self._uninformative: dict[tuple, tuple[bool, ...]] = {}  # problem -> per test: some stub passes it
        self._lock = threading.Lock()
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
    def score(self, outcome: ExecutionOutcome, uninformative: Sequence[bool] | None = None) -> float:
        """The scalar of one outcome under this reward's mode. ``uninformative`` (progress mode): per test,
        whether a do-nothing program passes it (``uninformative_tests``); None counts every test."""
        status = outcome.status
        if status is Status.PASSED:
            return 1.0
        if self.mode == "binary":
            return 0.0
        if self.mode == "progress":
            if not outcome.total:
                return 0.0
            flags = list(uninformative) if uninformative is not None else [False] * outcome.total
            earned = sum(t.status is Status.PASSED and not flags[i] for i, t in enumerate(outcome.tests)
                         if i < len(flags))
            return earned / outcome.total
        if status is Status.SYNTAX_ERROR:
            return self.syntax_penalty
        base = outcome.passed / outcome.total if outcome.total else 0.0
        if status is Status.TIMEOUT:
            return max(base + self.timeout_penalty, self.timeout_penalty)
        if status is Status.RUNTIME_ERROR:
            return max(base + self.runtime_penalty, self.runtime_penalty)
        return max(base, self.wrong_answer_floor)

    def uninformative_tests(self, tests: Sequence[str], setup: str = "", entry_point: str = "",
                            task_id: str = "") -> tuple[bool, ...]:
        """Per test: whether some do-nothing program passes it. Measured in the sandbox once per problem."""
        return self._uninformative_for([(list(tests), setup or "", entry_point or "", task_id)])[0]

    def _uninformative_for(self, problems: list[tuple[list[str], str, str, str]]) -> list[tuple[bool, ...]]:
        keys = [(tuple(t), s, e) for t, s, e, _ in problems]
        with self._lock:
            todo = {k: p for k, p in zip(keys, problems) if k not in self._uninformative}
        jobs, owners = [], []
        for key, (tests, setup, entry, name) in todo.items():
            for stub in do_nothing_programs(tests, setup, entry or None):
                # Every test runs: which tests a stub passes is the measurement (and stubs are fast).
                jobs.append(Job(code=stub, tests=tests, setup=setup, timeout=min(self.timeout, 2.0),
                                task_id=f"{name} (do-nothing stub)", entry_point=entry, stop_after="never"))
                owners.append(key)
        found: dict[tuple, list[bool]] = {key: [False] * len(key[0]) for key in todo}
        for key, outcome in zip(owners, self.executor.run(jobs) if jobs else []):
            for i, t in enumerate(outcome.tests[:len(key[0])]):
                found[key][i] = found[key][i] or t.status is Status.PASSED
        with self._lock:
            for key, flags in found.items():
                self._uninformative[key] = tuple(flags)
            return [self._uninformative[k] for k in keys]

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
                            entry_point=entries[i] or "", extract=True, stop_after=self.stop_after))
            slots.append(i)
        for i, outcome in zip(slots, executor.run(jobs) if jobs else []):
            outcomes[i] = outcome
        for i in slots:
            outcomes[i].no_attempt = is_no_attempt(outcomes[i].code, entries[i] or None)
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
        if self.mode == "progress":
            n = len(outcomes)
            rows = list(zip(_column(tests, n, "tests"), _column(test_setup, n, "test_setup", ""),
                            _column(entry_point, n, "entry_point", ""), _column(kwargs.get("task_id"), n, "task_id", "")))
            flags = self._uninformative_for([(list(t), s or "", e or "", str(k or "")) for t, s, e, k in rows])
            rewards = [self.score(o, f) for o, f in zip(outcomes, flags)]
        else:
            rewards = [self.score(o) for o in outcomes]
        if log_metric is not None and outcomes:
            n = len(outcomes)
            for status in Status:
                log_metric(f"execution/{status.value}", sum(o.status is status for o in outcomes) / n)
            # Tests skipped by the stopping rule count in the total, never as passed: under binary ("failure")
            # tests_passed is the share passed before the first failure, a lower bound. They carry the stopping
            # test's status, so test_timeouts counts a looping completion's skipped tests as timeouts, as it did
            # when they ran and timed out; tests_not_run says how many were skipped.
            log_metric("execution/tests_passed", sum(o.passed / max(o.total, 1) for o in outcomes) / n)
            log_metric("execution/test_timeouts",
                       sum(t.status is Status.TIMEOUT for o in outcomes for t in o.tests) / n)
            log_metric("execution/tests_not_run", sum(o.not_run for o in outcomes) / n)
            log_metric("execution/no_attempt", sum(o.no_attempt for o in outcomes) / n)
        if log_extra is not None:
            log_extra("execution_status", [o.status.value for o in outcomes])
        return rewards
