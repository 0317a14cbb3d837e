"""A study's results: the per-iteration rows rendered as the reference card's table, a one-line summary per
iteration, the trajectory plot, and the adapters' model cards."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

RESULTS_JSONL, RESULTS_MD, RESULTS_PNG = "results.jsonl", "results.md", "results.png"


def best_iteration(rows: Sequence[dict], primary: str = "humaneval/pass@1",
                   tie: str = "mbpp-heldout/pass@5") -> int | None:
    """The trained iteration (>= 1) with the highest ``primary`` score, ties broken by ``tie`` then by the
    earlier iteration. Falls back to the first eval set's pass@1 when ``primary`` is absent."""
    trained = [r for r in rows if r["iteration"] >= 1]
    if not trained:
        return None
    if primary not in trained[0]:
        keys = [k for k in trained[0] if k.endswith("/pass@1")]
        primary = keys[0] if keys else primary
    return max(trained, key=lambda r: (r.get(primary) or 0.0, r.get(tie) or 0.0, -r["iteration"]))["iteration"]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a" if digits else ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.1e}"
    return str(value)


def results_table(rows: Sequence[dict], benchmarks: Sequence[str]) -> str:
    """The per-iteration table in the reference card's format (plus completion tokens and group size), then the
    mean reward and the share of samples that make no attempt (train rollouts, evaluation samples)."""
    label = {"humaneval": "HumanEval", "mbpp-heldout": "MBPP-held"}
    head = ["Iter"]
    for b in benchmarks:
        head += [f"{label.get(b, b)} pass@1", f"{label.get(b, b)} pass@5"]
    head += ["Train pass rate", "GRPO KL", "Mean tokens", "Mean group size", "Mean reward", "No-attempt (train)",
             "No-attempt (eval)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["iteration"])]
        for b in benchmarks:
            cells += [_fmt(r.get(f"{b}/pass@1")), _fmt(r.get(f"{b}/pass@5"))]
        trained = r["iteration"] >= 1
        cells += [_fmt(r.get("train_pass_rate")) if trained else "", _fmt(r.get("kl"), 4) if trained else "",
                  _fmt(r.get("completion_tokens"), 1) if trained else "",
                  _fmt(r.get("mean_group_size"), 2) if trained else "", _fmt(r.get("reward")) if trained else "",
                  _fmt(r.get("no_attempt"), 2) if trained else "", _fmt(_eval_no_attempt(r, benchmarks), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _eval_no_attempt(row: dict, benchmarks: Sequence[str]) -> float | None:
    values = [row.get(f"{b}/no_attempt") for b in benchmarks]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def primary_pass_key(rows: Sequence[dict], benchmarks: Sequence[str]) -> str | None:
    """The held-out set's pass@1 (the one a collapse shows in first), else the first set's."""
    keys = [f"{b}/pass@1" for b in benchmarks]
    held = [k for k in keys if "heldout" in k or "held-out" in k]
    for key in held + keys:
        if any(r.get(key) is not None for r in rows):
            return key
    return None


def iteration_summary(row: dict, rows: Sequence[dict], benchmarks: Sequence[str], iterations: int) -> str:
    """One line per iteration for a person to read: pass@1 per set (and its change since iteration 0), train pass
    rate, no-attempt share, reward, KL, times; the collapse warning when it fired.

    Example:
    ```python
    >>> base = {"iteration": 0, "heldout/pass@1": 0.158, "eval_seconds": 9.0}
    >>> row = {"iteration": 1, "heldout/pass@1": 0.267, "train_pass_rate": 0.05, "no_attempt": 0.0,
    ...        "reward": 0.07, "kl": 0.0012, "train_seconds": 61.0, "eval_seconds": 8.0}
    >>> print(iteration_summary(row, [base, row], ["heldout"], 6))
    iteration 1/6 | heldout pass@1 0.267 (+0.109) | train pass rate 0.050 | no-attempt 0.00 | reward 0.070 | KL 0.0012 | training 61 s, eval 8 s
    ```
    """
    base = next((r for r in rows if r["iteration"] == 0), {})
    parts = [f"iteration {row['iteration']}/{iterations}"]
    for b in benchmarks:
        value = row.get(f"{b}/pass@1")
        if value is None:
            continue
        delta = value - base[f"{b}/pass@1"] if row["iteration"] and base.get(f"{b}/pass@1") is not None else None
        parts.append(f"{b} pass@1 {value:.3f}" + (f" ({delta:+.3f})" if delta is not None else ""))
    if row["iteration"] >= 1:
        for key, name, digits in (("train_pass_rate", "train pass rate", 3), ("no_attempt", "no-attempt", 2),
                                  ("reward", "reward", 3), ("kl", "KL", 4)):
            if row.get(key) is not None:
                parts.append(f"{name} {_fmt(row[key], digits)}")
    elif _eval_no_attempt(row, benchmarks) is not None:
        parts.append(f"no-attempt {_eval_no_attempt(row, benchmarks):.2f}")
    times = [f"training {row['train_seconds']:.0f} s"] if row["iteration"] and row.get("train_seconds") else []
    times.append(f"eval {row.get('eval_seconds', 0):.0f} s")
    parts.append(", ".join(times))
    line = " | ".join(parts)
    if row.get("collapse_warning"):
        line += "\n  WARNING: " + row["collapse_warning"]
    return line


def plot_results(rows: Sequence[dict], benchmarks: Sequence[str], path: str | os.PathLike) -> None:
    """results.png: pass@1/pass@5 per benchmark over iterations, and the KL to the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    iters = [r["iteration"] for r in rows]
    for b in benchmarks:
        for k, style in ((1, "-o"), (5, "--s")):
            ys = [r.get(f"{b}/pass@{k}") for r in rows]
            if any(y is not None for y in ys):
                ax.plot(iters, [y if y is not None else float("nan") for y in ys], style, label=f"{b} pass@{k}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("score")
    ax.set_title("Evaluation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    trained = [r for r in rows if r["iteration"] >= 1]
    ti = [r["iteration"] for r in trained]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in trained]

    ax_kl.plot(ti, series("train_pass_rate"), "-s", label="train pass rate")
    ax_kl.plot(ti, series("no_attempt"), "-^", label="no-attempt share (train)")
    ax_kl.plot(ti, series("reward"), "-d", label="mean reward")
    ax_kl2 = ax_kl.twinx()
    ax_kl2.plot(ti, series("kl"), ":o", color="gray", label="KL to reference (right axis)")
    ax_kl2.set_ylabel("KL")
    ax_kl2.legend(fontsize=8, loc="lower right")
    ax_kl.set_xlabel("iteration")
    ax_kl.set_title("Training")
    ax_kl.grid(alpha=0.3)
    ax_kl.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(output_dir: str | os.PathLike, rows: Sequence[dict], benchmarks: Sequence[str]) -> None:
    """results.jsonl, results.md and results.png from the rows (rewritten whole, so a resumed run ends with
    the same files as an uninterrupted one)."""
    out = Path(output_dir)
    tmp = out / (RESULTS_JSONL + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / RESULTS_JSONL)
    (out / RESULTS_MD).write_text(results_table(rows, benchmarks))
    plot_results(rows, benchmarks, out / RESULTS_PNG)


def model_card(rows: Sequence[dict], benchmarks: Sequence[str], settings: dict, iteration: int | None,
               kind: str) -> str:
    """The adapter's README.md, filled from the run's results."""
    row = next((r for r in rows if r["iteration"] == iteration), None)
    base = settings.get("model_name_or_path")
    head = f"{kind} adapter" + (f" (iteration {iteration})" if iteration is not None else "")
    scores = ", ".join(f"{b} pass@1 {_fmt(row.get(f'{b}/pass@1'))}" for b in benchmarks) if row else "n/a"
    setup = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    return f"""---
base_model: {base}
library_name: peft
tags: [spark-trl, trl, grpo, code-generation, lora]
---

# {settings.get('run_name') or 'spark-trl'}: {head}

QLoRA adapter trained with execution-grounded GRPO (spark-trl): the reward comes from running the generated
Python against MBPP unit tests in a sandbox. Evaluated after every iteration on the sets below
({settings.get('eval_n_samples')} samples per problem, temperature {settings.get('eval_temperature')},
top_p {settings.get('eval_top_p')}, unbiased pass@k).

This adapter: {scores}.

## Training setup

{setup}

## Evaluation results

{results_table(rows, benchmarks)}
Train pass rate: share of the iteration's rollouts that passed every test. GRPO KL: KL to the reference policy
on the training rollouts in the loss, each sequence's mean per-token k3 estimate averaged over sequences (the
reference card's measure). Iteration 0 is the base model.

## Usage

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto", device_map="auto")
model = PeftModel.from_pretrained(base, "path/to/this/adapter")
tok = AutoTokenizer.from_pretrained("{base}")
```
"""
