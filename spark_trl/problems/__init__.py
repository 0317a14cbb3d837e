"""spark-trl's built-in problem set: small, original Python problems in MBPP's format, for the demo and tests.

163 training problems (``train.json``) and 62 held-out ones (``heldout.json``), written for spark-trl, each
with a reference solution and three or four asserts. They are easy on purpose: a 135M-parameter instruct model
solves some of them, which is what a GRPO run needs to have a learning signal at all (a group whose rollouts
all fail has zero advantage). At least two asserts of every problem fail for a program that ignores the task
(a constant, an echo of its first argument). Rows use MBPP-sanitized field names (``task_id``, ``prompt``,
``code``, ``test_imports``, ``test_list``), so ``spark_trl.data.load_problems`` reads the files as they are.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

from ..data import DataError, Problem, load_problems

SPLITS = ("train", "heldout")
TASK_PREFIX = "Builtin"


def builtin_path(split: str = "train") -> Path:
    """The JSON file of a split of the built-in problems."""
    if split not in SPLITS:
        raise DataError(f"unknown built-in split {split!r}; choose one of {', '.join(SPLITS)}")
    return Path(str(resources.files(__name__).joinpath(f"{split}.json")))


def load_builtin(split: str = "train") -> list[Problem]:
    """The built-in problems of ``split`` (``train``: 163, ``heldout``: 62), task ids ``Builtin/<n>``.

    Example:
    ```python
    >>> problems = load_builtin("heldout")
    >>> len(problems), problems[0].task_id, problems[0].entry_point
    (62, 'Builtin/9901', 'triple')
    ```
    """
    return [dataclasses.replace(p, task_id=f"{TASK_PREFIX}/{p.number}") for p in load_problems(builtin_path(split))]
