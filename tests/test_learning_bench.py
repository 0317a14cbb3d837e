"""benchmarks/gpu_learning_bench.py's report on CPU: per-iteration spread over seeds, the per-run verdict, the
collapse marker and the time-to-accuracy arithmetic, from results files laid out as the runs write them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from spark_trl.demo import DEMO_SIZES
from spark_trl.profiling import PHASES

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_learning_bench", REPO / "benchmarks" / "gpu_learning_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(root: Path, name: str, series: list[tuple[float, float]], warn_at: int | None = None):
    (root / name).mkdir(parents=True)
    rows = []
    for i, (pass1, seconds) in enumerate(series):
        row = {"iteration": i, "builtin-heldout/pass@1": pass1, "builtin-heldout/pass@5": pass1 + 0.1,
               "train_seconds": seconds}
        if i:
            row.update(train_pass_rate=0.1 * i, reward=0.1 * i, kl=0.001 * i, no_attempt=0.0)
        if warn_at == i:
            row["collapse_warning"] = "Training may be collapsing"
        rows.append(row)
    (root / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_spreads_verdicts_and_time_to_accuracy(tmp_path):
    learn, plain, out = tmp_path / "learn", tmp_path / "plain", tmp_path / "out"
    _run(learn, "progress-seed0", [(0.2, 0), (0.3, 50), (0.4, 100)])
    _run(learn, "progress-seed1", [(0.2, 0), (0.25, 60), (0.35, 120)])
    _run(learn, "study-seed0", [(0.2, 0), (0.05, 55), (0.0, 110)], warn_at=2)
    plain.mkdir()
    points = [{"step": 0, "train_seconds": 0.0, "pass@1": 0.2}, {"step": 5, "train_seconds": 200.0, "pass@1": 0.3},
              {"step": 9, "train_seconds": 400.0, "pass@1": 0.3}]
    (plain / "plain.json").write_text(json.dumps({"points": points}))
    assert _bench().main(["report", "--learn", str(learn), "--plain", str(plain), "--out", str(out)]) == 0
    summary = json.loads((out / "learning.json").read_text())
    progress = summary["modes"]["progress"]
    assert progress["per_iteration"][2]["builtin-heldout/pass@1"] == {"mean": 0.375, "min": 0.35, "max": 0.4, "n": 2}
    assert progress["per_run"]["progress-seed0"] == {"base": 0.2, "last": 0.4, "iterations": 2, "ratio": 2.0,
                                                      "gain": 0.2, "collapse_warning_at": None}
    assert summary["modes"]["study"]["per_run"]["study-seed0"]["collapse_warning_at"] == 2
    # The plain run first reaches its final 0.3 at 200 s; seed 0 at 50 s (4x), seed 1 at 120 s (iteration 2).
    tta = summary["time_to_accuracy"]
    assert tta["plain_seconds_to_final"] == 200.0
    assert tta["spark"]["progress-seed0"] == {"seconds": 50, "iteration": 1, "speedup": 4.0}
    assert tta["spark"]["progress-seed1"] == {"seconds": 120, "iteration": 2, "speedup": 1.7}
    assert "study-seed0" not in tta["spark"]  # compared: the progress runs
    for png in ("learning.png", "time_to_accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| progress-seed0 | 0.2 | 0.4 | 2.0 | 0.2 | 2 | no |" in (out / "learning.md").read_text()


def test_report_compares_the_timed_spark_run(tmp_path):
    plain, spark, out = tmp_path / "plain", tmp_path / "spark", tmp_path / "out"
    plain.mkdir()
    spark.mkdir()
    plain_points = [{"step": 0, "train_seconds": 0.0, "pass@1": 0.2}, {"step": 4, "train_seconds": 150.0, "pass@1": 0.32},
                    {"step": 8, "train_seconds": 300.0, "pass@1": 0.3}]
    spark_points = [{"step": 0, "train_seconds": 0.0, "pass@1": 0.2}, {"step": 3, "train_seconds": 10.0, "pass@1": 0.29},
                    {"step": 6, "train_seconds": 25.0, "pass@1": 0.31}, {"step": 9, "train_seconds": 40.0, "pass@1": 0.4}]
    (plain / "plain.json").write_text(json.dumps({"points": plain_points}))
    (spark / "spark.json").write_text(json.dumps({"points": spark_points}))
    assert _bench().main(["report", "--plain", str(plain), "--spark", str(spark), "--out", str(out)]) == 0
    tta = json.loads((out / "learning.json").read_text())["time_to_accuracy"]
    # The plain run's final 0.3 is first reached at 150 s; the spark run first reaches 0.3 at 25 s (6x).
    assert tta["plain_seconds_to_final"] == 150.0
    assert tta["spark_timed"] == {"seconds": 25.0, "step": 6, "speedup": 6.0, "final_pass@1": 0.4,
                                  "final_seconds": 40.0}
    assert (out / "time_to_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_timed_runs_train_and_evaluate_both_trainers_on_cpu(tmp_path, tiny_model_path):
    """`plain` and `spark` run their real trainers (a tiny model, 2 problems per step) until the training budget,
    evaluating at the start and at the end; the points carry training seconds that exclude evaluation."""
    bench = _bench()
    for kind in ("plain", "spark"):
        out = tmp_path / kind
        assert bench.main([kind, "--out", str(out), "--model", tiny_model_path, "--budget_s", "0.01",
                           "--train_problems", "4", "--heldout", "2", "--eval_samples", "5", "--max_new_tokens", "8",
                           "--prompts_per_step", "2", "--exec_workers", "2"]) == 0
        saved = json.loads((out / f"{kind}.json").read_text())
        points = saved["points"]
        assert [p["step"] for p in points] == [0, 1], kind  # the budget stops it after one optimizer step
        # Sampled at the demo's GPU temperature; the step's split per phase is kept beside the points
        assert saved["settings"]["temperature"] == DEMO_SIZES["cuda"]["temperature"]
        phases = saved["seconds_per_step_by_phase"]
        assert set(PHASES) <= set(phases) and phases["total"] >= phases["generate"] > 0, phases
        assert points[0]["train_seconds"] == 0.0 < points[1]["train_seconds"]
        assert all(0.0 <= p["pass@1"] <= 1.0 and p["pass@5"] is not None for p in points)


def test_variants_parse_and_report_as_their_own_configurations(tmp_path):
    bench = _bench()
    assert bench.parse_variants([]) == [("", [])]
    assert bench.parse_variants(["t07=--temperature 0.7 --learning_rate 1e-4"]) == [
        ("t07", ["--temperature", "0.7", "--learning_rate", "1e-4"])]
    for bad in (["--temperature 0.7"], ["a b=--x 1"], ["t=", "t=--x 1"]):
        with pytest.raises(SystemExit):
            bench.parse_variants(bad)
    learn, out = tmp_path / "learn", tmp_path / "out"
    _run(learn, "progress-seed0", [(0.2, 0), (0.3, 50)])
    _run(learn, "progress-t07-seed0", [(0.2, 0), (0.5, 50)])
    _run(learn, "progress-t07-seed1", [(0.2, 0), (0.4, 50)])
    assert bench.main(["report", "--learn", str(learn), "--out", str(out)]) == 0
    modes = json.loads((out / "learning.json").read_text())["modes"]
    assert set(modes) == {"progress", "progress-t07"}
    assert modes["progress-t07"]["per_iteration"][1]["builtin-heldout/pass@1"]["mean"] == 0.45
    assert set(modes["progress"]["per_run"]) == {"progress-seed0"}
