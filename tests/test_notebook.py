"""The Colab notebook: its structure, its GPU advice, and a headless run of every cell in smoke mode."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "spark_trl_colab.ipynb"


@pytest.fixture(scope="module")
def notebook():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_clean_and_has_every_step(notebook):
    # Committed without outputs (a stale output would be mistaken for a result) and every code cell parses.
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None
            ast.parse(cell.source)
    text = "\n".join(c.source for c in notebook.cells)
    for needle in ("pip", "install", "gpu_advice", "T4", "L4", "A100", "condition_a_v2", "run_study",
                   "results.md", "results.png", "PeftModel.from_pretrained", "is_palindrome", "push", "HUB_REPO_ID",
                   "colab-badge.svg"):
        assert needle in text, needle
    assert any("parameters" in c.metadata.get("tags", []) for c in notebook.cells)


def test_gpu_advice_per_colab_gpu(notebook):
    source = next(s for s in _code(notebook) if "def gpu_advice" in s)
    tree = ast.parse(source)
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "gpu_advice")
    namespace: dict = {}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(NOTEBOOK), "exec"), namespace)
    advice = namespace["gpu_advice"]
    t4, l4 = advice("Tesla T4", 14.7), advice("NVIDIA L4", 22.2)
    a100, small = advice("NVIDIA A100-SXM4-40GB", 39.6), advice("Tesla K80", 11.2)
    assert t4["dtype"] == "float16" and "bf16" in t4["advice"]  # T4 has no bfloat16
    assert l4["dtype"] == a100["dtype"] == "bfloat16"
    assert t4["eval_batch_size"] < l4["eval_batch_size"] < a100["eval_batch_size"]
    assert t4["fits"] and l4["fits"] and a100["fits"] and not small["fits"]


@pytest.mark.slow
def test_notebook_runs_headless_in_smoke_mode(tmp_path, monkeypatch):
    """Every cell, in order, in a real kernel (what CI does), with the tiny offline model on CPU."""
    import nbformat
    from nbclient import NotebookClient

    out = tmp_path / "run"
    monkeypatch.setenv("SPARK_TRL_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("SPARK_TRL_NOTEBOOK_OUTPUT", str(out))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("SPARK_TRL_MBPP", os.environ.get("SPARK_TRL_MBPP", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert "builtin-heldout/pass@1" in rows[0] and rows[1]["train_rollouts"]
    for path in ("results.md", "results.png", "checkpoints/iter1", "final/adapter_config.json",
                 "best/adapter_config.json", "best/README.md"):
        assert (out / path).exists(), path
    outputs = {i: "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    texts = "\n".join(outputs.values())
    assert "smoke mode" in texts and "complete - best iteration: 1" in texts
    assert "Not pushing" in texts
    # The results cell displayed the table and the plot.
    results_cell = next(c for c in nb.cells if c.cell_type == "code" and "results.png" in c.source)
    kinds = {k for o in results_cell.outputs for k in o.get("data", {})}
    assert {"text/markdown", "image/png"} <= kinds
