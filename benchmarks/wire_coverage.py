"""How many MBPP and HumanEval tests depend on what the sandbox's wire does not carry.

Tests run in the trusted judge and reach the program only through plain data (see docs/sandbox.md). This
script measures, on every test of MBPP-sanitized (427 problems) and HumanEval (164, checks split as the reward
splits them), what the tests do across that boundary, by running each reference solution under plain ``exec``
with every program function the test calls wrapped in a recorder:

* results with no plain-data form (they cross as handles: usable by call/attribute/iteration/len/str/bool,
  equal only to another object of the same program);
* in-place changes of arguments, by where the container sat (positional, keyword, nested) - carried since
  round two - and changes, during a later call, of a container passed in an earlier one (not carried);
* a program object compared with ``==``/``!=`` (tests that instantiate the program's classes);
and, from each test's syntax tree, identity checks (``is``) on anything but None/True/False and tests that
catch the program's exceptions (``try``), neither of which the judge reproduces for plain data.

    .venv/bin/python benchmarks/wire_coverage.py [--mbpp sanitized-mbpp.json]
"""

from __future__ import annotations

import argparse
import ast
import collections
import importlib
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _import_light():
    if "spark_trl" not in sys.modules:
        pkg = types.ModuleType("spark_trl")
        pkg.__path__ = [str(REPO / "spark_trl")]
        sys.modules["spark_trl"] = pkg
    return importlib.import_module("spark_trl.sandbox.wire"), importlib.import_module("spark_trl.data")


class Recorder:
    """Wraps the program's functions for one test and records what crosses."""

    def __init__(self, wire):
        self.wire = wire
        self.seen: list = []  # containers passed so far in this test, with their contents when last returned
        self.features: set[str] = set()
        self.kinds: set[str] = set()  # types of results without plain-data form

    def _plain(self, value) -> bool:
        def refuse(obj):
            raise self.wire.Unencodable(type(obj).__name__)

        try:
            self.wire.encode(value, refuse)
            return True
        except (self.wire.Unencodable, RecursionError, ValueError, OverflowError):
            return False

    def _snapshot(self, obj) -> bytes | None:
        try:
            return self.wire.encode(obj, lambda o: id(o) & 0xFFFFFFFF)
        except (self.wire.Unencodable, RecursionError, ValueError, OverflowError):
            return None

    def _containers(self, value, where: str, out: list, depth: int = 0) -> None:
        if depth > 20:
            return
        if type(value) in self.wire.MUTABLE:
            out.append((value, where))
        if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
            for item in value:
                self._containers(item, "nested", out, depth + 1)
        elif isinstance(value, dict):
            for item in value.values():
                self._containers(item, "nested", out, depth + 1)

    def wrap(self, fn):
        if not callable(fn) or isinstance(fn, type):
            return fn

        def recorded(*args, **kwargs):
            mine: list = []
            for a in args:
                self._containers(a, "positional", mine)
            for v in kwargs.values():
                self._containers(v, "keyword", mine)
            before = [(obj, where, self._snapshot(obj)) for obj, where in mine]
            earlier = [(obj, self._snapshot(obj)) for obj, _ in self.seen if all(obj is not m for m, _ in mine)]
            result = fn(*args, **kwargs)
            for obj, where, snap in before:
                if self._snapshot(obj) != snap:
                    self.features.add(f"mutates a {where} argument")
            for obj, snap in earlier:
                if self._snapshot(obj) != snap:
                    self.features.add("mutates a container of an earlier call")
            self.seen += mine
            if not self._plain(result):
                self.features.add("result without plain-data form")
                self.kinds.add(type(result).__name__)
            return result

        return recorded


def static_features(test: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(test)):
        if isinstance(node, ast.Compare):
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.Is, ast.IsNot)) and not (
                        isinstance(right, ast.Constant) and right.value in (None, True, False)):
                    found.add("identity check on a value")
        if isinstance(node, ast.Try):
            found.add("catches an exception")
    return found


def measure(problems, wire) -> tuple[int, collections.Counter, list, dict]:
    counts: collections.Counter = collections.Counter()
    kinds: dict = collections.defaultdict(set)
    failures = []
    total = 0
    for p in problems:
        program: dict = {"__name__": "__program__"}
        exec(compile(p.test_setup + "\n" + p.reference, p.task_id, "exec"), program)
        classes = {n for n, v in program.items() if isinstance(v, type) and getattr(v, "__module__", "") == "__program__"}
        for test in p.tests:
            total += 1
            recorder = Recorder(wire)
            namespace = {n: recorder.wrap(v) if callable(v) and not isinstance(v, types.ModuleType) else v
                         for n, v in program.items()}
            namespace["__name__"] = "__main__"
            features = static_features(test)
            tree = ast.parse(test)
            if any(isinstance(n, ast.Name) and n.id in classes for n in ast.walk(tree)):
                features.add("instantiates a program class")
            try:
                exec(compile(test, f"{p.task_id} test", "exec"), namespace)
            except BaseException as exc:  # noqa: BLE001 - a reference that fails its own test: reported
                failures.append((p.task_id, type(exc).__name__))
            for f in features | recorder.features:
                counts[f] += 1
            for kind in recorder.kinds:
                kinds[kind].add(p.task_id)
    return total, counts, failures, kinds


FEATURES = [
    ("result without plain-data form", "carried as a handle"),
    ("instantiates a program class", "handle; == between two program objects since round two"),
    ("mutates a positional argument", "carried"),
    ("mutates a keyword argument", "carried since round two"),
    ("mutates a nested argument", "carried since round two"),
    ("mutates a container of an earlier call", "NOT carried"),
    ("identity check on a value", "NOT reproduced for plain data (containers of one call: yes)"),
    ("catches an exception", "NOT reproduced (the program's exception is a runtime error)"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mbpp", default=os.environ.get("SPARK_TRL_MBPP",
                                                         str(REPO / "tests" / "data" / "sanitized-mbpp.json")))
    args = parser.parse_args(argv)
    wire, data = _import_light()
    sys.setrecursionlimit(10000)
    for name, problems in (("MBPP-sanitized", data.load_mbpp(args.mbpp)),
                           ("HumanEval", data.load_humaneval())):
        total, counts, failures, kinds = measure(problems, wire)
        print(f"\n== {name}: {total} tests of {len(problems)} problems"
              f"{' (references failing their own test: ' + str(failures) + ')' if failures else ''}")
        for feature, status in FEATURES:
            n = counts.get(feature, 0)
            print(f"  {feature:42s} {n:5d} tests  {100 * n / total:5.2f} %   {status}")
        for kind, tasks in sorted(kinds.items()):
            print(f"    results of type {kind}: {', '.join(sorted(tasks))}")


if __name__ == "__main__":
    main()
