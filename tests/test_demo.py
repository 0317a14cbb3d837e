"""The embedded demo: the built-in problem set, the SmolLM2 conversion and ``spark-trl demo`` end to end."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spark_trl.data import load_problems
from spark_trl.problems import builtin_path, load_builtin

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ the problem set


@pytest.fixture(scope="module")
def builtin():
    return {split: load_builtin(split) for split in ("train", "heldout")}


def test_builtin_problem_set_shape(builtin):
    train, heldout = builtin["train"], builtin["heldout"]
    assert 30 <= len(train) <= 60 and 8 <= len(heldout) <= 20
    ids = [p.task_id for p in train + heldout]
    assert len(set(ids)) == len(ids) and all(i.startswith("Builtin/") for i in ids)
    # Held-out problems are really held out: no entry point and no task statement shared with training.
    assert not {p.entry_point for p in train} & {p.entry_point for p in heldout}
    assert not {p.text for p in train} & {p.text for p in heldout}
    for p in train + heldout:
        assert len(p.tests) >= 3, p.task_id
        assert all(t.startswith(f"assert {p.entry_point}(") or p.entry_point in t for t in p.tests), p.task_id
        assert f"def {p.entry_point}(" in p.prompt, p.task_id  # the signature is shown to the model
        ast.parse(p.reference)


def test_builtin_rows_are_mbpp_format():
    # The same file reads through the generic loader, so users can copy it as a template for their own set.
    rows = json.loads(builtin_path("heldout").read_text())
    assert {"task_id", "prompt", "code", "test_imports", "test_list"} <= set(rows[0])
    assert [p.entry_point for p in load_problems(builtin_path("heldout"))] == \
        [p.entry_point for p in load_builtin("heldout")]
    with pytest.raises(ValueError, match="unknown built-in split"):
        builtin_path("test")


def _program(p, code):
    return f"{p.test_setup}\n{code}\n\n" + "\n".join(p.tests) + "\n"


def test_reference_solutions_pass_plain_exec(builtin):
    # Each reference in a fresh interpreter, every assert of the problem after it: exit 0 only if all hold.
    failures = []
    for p in builtin["train"] + builtin["heldout"]:
        proc = subprocess.run([sys.executable, "-c", _program(p, p.reference)], capture_output=True, text=True,
                              timeout=30)
        if proc.returncode != 0:
            failures.append((p.task_id, proc.stderr[-300:]))
    assert not failures


def test_tests_reject_wrong_solutions(builtin):
    # A trivial wrong program (returns None) fails at least one assert of every problem: the asserts can fail.
    survivors = []
    for p in builtin["train"] + builtin["heldout"]:
        signature = p.meta["signature"]
        proc = subprocess.run([sys.executable, "-c", _program(p, f"{signature}\n    return None\n")],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode == 0:
            survivors.append(p.task_id)
    assert not survivors


def test_reference_solutions_pass_the_sandbox(builtin):
    from spark_trl.sandbox import Executor, Job

    problems = builtin["train"] + builtin["heldout"]
    jobs = [Job(p.reference, list(p.tests), setup=p.test_setup, task_id=p.task_id, entry_point=p.entry_point)
            for p in problems]
    wrong = [Job(p.reference.replace("return ", "return 1 + ", 1) if "return " in p.reference else "x = 1",
                 list(p.tests), setup=p.test_setup, task_id=p.task_id, entry_point=p.entry_point)
             for p in problems[:5]]
    with Executor(workers=2, timeout=10) as ex:
        outcomes = ex.run(jobs + wrong)
    good, bad = outcomes[: len(jobs)], outcomes[len(jobs):]
    assert [p.task_id for p, o in zip(problems, good) if not o.all_passed] == []
    assert all(o.total == len(p.tests) for p, o in zip(problems, good))
    assert not any(o.all_passed for o in bad)
