"""The study runner: results files, best-checkpoint choice, output-dir safety, atomic checkpoints, out-of-memory
recovery, and a real run killed with SIGKILL (and one stopped with SIGTERM) then resumed."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from spark_trl.runner import (STUDY_STATE, StudyArguments, StudyError, best_iteration, find_resume_checkpoint,
                              model_card, parse_recipe, results_table, run_study, write_results)

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    {"iteration": 0, "humaneval/pass@1": 0.796, "humaneval/pass@5": 0.854, "mbpp-heldout/pass@1": 0.634,
     "mbpp-heldout/pass@5": 0.68},
    {"iteration": 1, "humaneval/pass@1": 0.806, "humaneval/pass@5": 0.872, "mbpp-heldout/pass@1": 0.628,
     "mbpp-heldout/pass@5": 0.68, "train_pass_rate": 0.593, "kl": 0.0003, "completion_tokens": 181.0,
     "mean_group_size": 5.2},
    {"iteration": 2, "humaneval/pass@1": 0.816, "humaneval/pass@5": 0.872, "mbpp-heldout/pass@1": 0.638,
     "mbpp-heldout/pass@5": 0.69, "train_pass_rate": 0.649, "kl": 0.0023, "completion_tokens": 184.0,
     "mean_group_size": 5.0},
    {"iteration": 3, "humaneval/pass@1": 0.816, "humaneval/pass@5": 0.872, "mbpp-heldout/pass@1": 0.638,
     "mbpp-heldout/pass@5": 0.71, "train_pass_rate": 0.672, "kl": 0.0024, "completion_tokens": 186.0,
     "mean_group_size": 4.8},
]
BENCH = ["humaneval", "mbpp-heldout"]


def test_best_iteration_breaks_ties_by_mbpp_pass_at_5():
    assert best_iteration(ROWS) == 3  # iterations 2 and 3 tie on HumanEval pass@1; 3 has the better MBPP pass@5
    assert best_iteration(ROWS[:3]) == 2
    assert best_iteration(ROWS[:1]) is None  # the baseline is no adapter


def test_results_table_has_the_cards_columns_and_rows(tmp_path):
    table = results_table(ROWS, BENCH)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Iter | HumanEval pass@1 | HumanEval pass@5 | MBPP-held pass@1 | MBPP-held pass@5 |"
                               " Train pass rate | GRPO KL |")
    assert lines[2].split("|")[1:6] == [" 0 ", " 0.796 ", " 0.854 ", " 0.634 ", " 0.680 "]
    assert "| 2 | 0.816 | 0.872 | 0.638 | 0.690 | 0.649 | 0.0023 |" in table
    write_results(tmp_path, ROWS, BENCH)
    assert [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()] == ROWS
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    card = model_card(ROWS, BENCH, {"model_name_or_path": "Qwen/Qwen2.5-Coder-3B-Instruct"}, 3, "Best")
    assert "base_model: Qwen/Qwen2.5-Coder-3B-Instruct" in card and "iteration 3" in card
    assert "humaneval pass@1 0.816" in card and table in card


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    ck = tmp_path / "checkpoints"
    for name, step, rows in [("iter1", 4, 2), ("last", 6, 2), (".tmp-last", 9, 2), ("iter2", 8, 3)]:
        (ck / name).mkdir(parents=True)
        (ck / name / STUDY_STATE).write_text(json.dumps({"global_step": step, "rows": [{}] * rows}))
    (ck / "half-written").mkdir()  # no study_state.json: incomplete
    assert find_resume_checkpoint(tmp_path).name == "iter2"
    (ck / ".old-last").mkdir()
    (ck / ".old-last" / STUDY_STATE).write_text(json.dumps({"global_step": 10, "rows": [{}] * 3}))
    assert find_resume_checkpoint(tmp_path).name == ".old-last"  # a swap interrupted between its two renames


def _argv(model, out, mbpp, *extra):
    # The on-policy schedule: one optimizer step per problem, so that the steps these tests stop, kill and resume
    # at exist whatever the rewards (the tiny model's 4-token completions never pass, so under the study's epoch
    # schedule every iteration would be a single step without gradient).
    return ["--rollout_schedule", "batch", "--steps_per_generation", "1", "--model_name_or_path", str(model), "--output_dir", str(out), "--mbpp_path", str(mbpp),
            "--max_train_problems", "2", "--iterations", "2", "--load_in_4bit", "false", "--dtype", "float32",
            "--eval_limit", "1", "--eval_n_samples", "2", "--eval_max_new_tokens", "4", "--eval_batch_size", "4",
            "--max_completion_length", "4", "--gradient_checkpointing", "false", "--use_cpu", "true",
            "--min_generations", "2", "--max_generations", "2", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--exec_workers", "2", "--exec_timeout", "5",
            "--logging_steps", "1", "--disable_tqdm", "true", *extra]


def test_output_dir_with_results_is_refused_before_loading(tmp_path, mbpp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.jsonl").write_text('{"iteration": 0}\n')
    study, targs, margs = parse_recipe({}, _argv(tmp_path / "no-such-model", out, mbpp_path))
    with pytest.raises(StudyError, match="already holds"):
        run_study(study, targs, margs)
    study.resume = True
    with pytest.raises(StudyError, match="no complete checkpoint"):
        run_study(study, targs, margs)
    assert (out / "results.jsonl").read_text() == '{"iteration": 0}\n'  # nothing lost
    with pytest.raises(ValueError, match="contradict"):
        StudyArguments(resume=True, overwrite=True)


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    for r in rows:  # wall times differ between any two runs
        r.pop("eval_seconds")
        assert r.pop("train_seconds") >= 0
    return rows


def _run(argv, env=None, **kwargs):
    return subprocess.Popen([sys.executable, str(REPO / "recipes" / "condition_a.py"), *argv], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_path, mbpp_path, tmp_path_factory):
    """Condition A's recipe, run in this process on the tiny model: 2 iterations of 2 steps."""
    from spark_trl.runner import RECIPES

    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_study(*parse_recipe(RECIPES["condition_a"], _argv(tiny_model_path, out, mbpp_path)), progress=False)
    assert result["status"] == "complete" and result["exit_code"] == 0
    return out


@pytest.mark.slow
def test_recipe_runs_end_to_end(uninterrupted):
    out = uninterrupted
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["global_step"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert 0.0 <= r["humaneval/pass@1"] <= 1 and 0.0 <= r["mbpp-heldout/pass@1"] <= 1
    for r in rows[1:]:
        assert r["train_rollouts"] == 4 and r["group_sizes"] == {"2": 2}
        assert 0.0 <= r["train_pass_rate"] <= 1 and r["completion_tokens"] > 0
    for name in ("iter1", "iter2", "last"):
        ck = out / "checkpoints" / name
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", STUDY_STATE,
                "tokenizer_config.json"} <= {p.name for p in ck.iterdir()}, name
        assert any(p.name.startswith("rng_state") for p in ck.iterdir())
    assert json.loads((out / "checkpoints" / "iter1" / "trainer_state.json").read_text())["global_step"] == 2
    for name in ("final", "best"):
        files = {p.name for p in (out / name).iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files
        assert not {f for f in files if f.startswith(("optimizer", "rng_state", "spark_epoch", "trainer_state"))}
    best = best_iteration(rows)
    assert "iteration %d" % best in (out / "best" / "README.md").read_text()
    best_weights, iter_weights = _adapter(out / "best"), _adapter(out / "checkpoints" / f"iter{best}")
    assert all(torch.equal(best_weights[k], iter_weights[k]) for k in iter_weights)
    final, last = _adapter(out / "final"), _adapter(out / "checkpoints" / "iter2")
    assert all(torch.equal(final[k], last[k]) for k in last)
    assert (out / "results.md").read_text().count("\n") == 5
    assert (out / "results.png").stat().st_size > 0
    assert len((out / "eval" / "iter2" / "humaneval.samples.jsonl").read_text().splitlines()) == 2


def _same_artefacts(a: Path, b: Path):
    assert _rows(a) == _rows(b)
    for name in ("final", "best", "checkpoints/iter1", "checkpoints/iter2"):
        wa, wb = _adapter(a / name), _adapter(b / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")
    listing = {p.relative_to(a).as_posix() for p in a.rglob("*")}
    assert listing == {p.relative_to(b).as_posix() for p in b.rglob("*")}


def _wait_for_step(out: Path, proc, step: int, timeout: float = 240):
    state = out / "checkpoints" / "last" / STUDY_STATE
    deadline = time.time() + timeout
    while time.time() < deadline:
        if state.exists():
            try:
                if json.loads(state.read_text())["global_step"] >= step:
                    return
            except (json.JSONDecodeError, OSError, KeyError):
                pass
        if proc.poll() is not None:
            pytest.fail("run ended before the checkpoint: " + proc.stdout.read()[-3000:])
        time.sleep(0.1)
    pytest.fail(f"no checkpoint at step {step} within {timeout}s")


class _SignalAt(TrainerCallback):
    """Sends a real signal to this process while optimizer step ``step`` is in flight (the handler is the
    runner's)."""

    def __init__(self, step: int, sig: int):
        self.step, self.sig = step, sig

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.sig)


@pytest.mark.slow
def test_stopped_and_killed_runs_resume_to_the_same_artefacts(uninterrupted, tiny_model_path, mbpp_path, tmp_path,
                                                              capsys, caplog):
    """SIGTERM at step 1 (clean stop, resume command); resumed by recipes/condition_a.py as a script and killed
    there with SIGKILL at step 3 (no clean-up at all); resumed again: the artefacts are those of the
    uninterrupted run (same rows, same adapter weights, same files)."""
    from spark_trl.runner import RECIPES

    out = tmp_path / "run"
    argv = _argv(tiny_model_path, out, mbpp_path)
    result = run_study(*parse_recipe(RECIPES["condition_a"], argv), progress=False,
                       callbacks=[_SignalAt(1, signal.SIGTERM)])
    assert result["status"] == "interrupted" and result["exit_code"] == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 1" in err and "--resume" in err.split("Resume with:")[1]
    assert json.loads((out / "checkpoints" / "last" / STUDY_STATE).read_text())["global_step"] == 1
    assert not (out / "final").exists() and [r["iteration"] for r in _rows(out)] == [0]

    proc = _run(argv + ["--resume", "true"])
    _wait_for_step(out, proc, 3)
    proc.send_signal(signal.SIGKILL)  # no handler, no clean-up: as a crash or the OOM killer would
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "final").exists()
    assert "resuming from" in log and "optimizer step 1" in log

    caplog.clear()
    caplog.set_level(logging.INFO, logger="spark_trl.runner")
    result = run_study(*parse_recipe(RECIPES["condition_a"], argv + ["--resume", "true"]), progress=False)
    assert result["status"] == "complete", caplog.text[-2000:]
    assert "optimizer step 3" in caplog.text
    _same_artefacts(uninterrupted, out)


class _InjectOOM(TrainerCallback):
    """Raises torch.OutOfMemoryError from the model's forward (generation or loss) during training steps from
    ``from_step`` on, ``times`` times, as a GPU shared with another process would."""

    def __init__(self, from_step: int, times: int):
        self.from_step, self.times, self.raised, self.armed = from_step, times, 0, False

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step + 1 >= self.from_step

    def on_step_end(self, args, state, control, **kwargs):
        self.armed = False

    def hook(self, module, args):
        if self.armed and self.raised < self.times:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def _in_process(model_path, out, mbpp_path, inject, *extra):
    from spark_trl.models import load_model, load_tokenizer

    study, targs, margs = parse_recipe({}, _argv(model_path, out, mbpp_path, "--iterations", "1",
                                                 "--max_train_problems", "3", *extra))
    model = load_model(model_path, dtype="float32", check_memory=False)
    handle = model.register_forward_pre_hook(inject.hook) if inject is not None else None
    try:
        return run_study(study, targs, margs, model=model, tokenizer=load_tokenizer(model_path),
                         command=f"python recipes/condition_a.py --output_dir {out}", progress=False,
                         callbacks=[inject] if inject is not None else [])
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.slow
def test_out_of_memory_is_retried_then_checkpointed_for_resume(tiny_model_path, mbpp_path, tmp_path, capsys,
                                                               caplog):
    # Once, in step 2: memory freed, the step retried, the run completes.
    inject = _InjectOOM(from_step=2, times=1)
    out = tmp_path / "retry"
    result = _in_process(tiny_model_path, out, mbpp_path, inject)
    assert inject.raised == 1 and result["status"] == "complete"
    assert [r["iteration"] for r in _rows(out)] == [0, 1] and _rows(out)[1]["global_step"] == 3
    assert "out of memory in training step 2 (attempt 1" in caplog.text
    # From step 2 on, for ever: emergency checkpoint, results so far, exit status 3, the resume command.
    out = tmp_path / "fail"
    inject = _InjectOOM(from_step=2, times=10**9)
    result = _in_process(tiny_model_path, out, mbpp_path, inject, "--oom_retries", "1")
    err = capsys.readouterr().err
    assert inject.raised == 2 and result["exit_code"] == 3 and result["status"] == "oom"
    assert "out of memory" in err and f"python recipes/condition_a.py --output_dir {out} --resume" in err
    assert [r["iteration"] for r in _rows(out)] == [0]
    assert json.loads((out / "checkpoints" / "last" / STUDY_STATE).read_text())["global_step"] == 1
    assert not (out / "final").exists()
    result = _in_process(tiny_model_path, out, mbpp_path, None, "--resume", "true")
    assert result["status"] == "complete" and [r["iteration"] for r in _rows(out)] == [0, 1]
    assert (out / "final" / "adapter_model.safetensors").exists()


def test_study_evaluation_reuses_the_trainers_fast_engine(tiny_model_path, mbpp_path, tmp_path, monkeypatch):
    """With the fast engine in the trainer, eval_rollout_engine='auto' samples the evaluation from that same engine
    (one dense copy of the weights, not two), with the evaluation's settings, and puts the training's back."""
    import spark_trl.rollout as rollout

    built, borrowed = [], []
    init, sampling = rollout.FastRolloutEngine.__init__, rollout.FastRolloutEngine.sampling

    def counting_init(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    def counting_sampling(self, args, **kwargs):
        borrowed.append((args.temperature, args.top_p, self.params.temperature))
        return sampling(self, args, **kwargs)

    monkeypatch.setattr(rollout.FastRolloutEngine, "__init__", counting_init)
    monkeypatch.setattr(rollout.FastRolloutEngine, "sampling", counting_sampling)
    out = tmp_path / "run"
    argv = _argv(tiny_model_path, out, mbpp_path, "--rollout_engine", "spark", "--iterations", "1")
    study, targs, margs = parse_recipe({}, argv)
    assert study.eval_rollout_engine == "auto" and targs.rollout_engine == "spark"
    result = run_study(study, targs, margs, progress=False)
    assert result["status"] == "complete"
    assert len(built) == 1 and built[0].active  # the trainer's engine only
    # Two evaluations (iterations 0 and 1) x two benchmarks, each with the evaluation's sampling (T 0.2, top_p
    # 0.95) on the engine that trains at T 1.0; afterwards it samples with the training's settings again.
    assert borrowed == [(0.2, 0.95, 1.0)] * 4
    assert built[0].params.temperature == 1.0 and built[0].params.top_p == 0.98
    assert len((out / "eval" / "iter1" / "humaneval.samples.jsonl").read_text().splitlines()) == 2


def test_eval_rollout_engine_auto_follows_the_trainer():
    from spark_trl.runner import StudyArguments

    study = StudyArguments()
    assert study.eval_config(1, trainer_engine=True).rollout_engine == "spark"
    assert study.eval_config(1, trainer_engine=False).rollout_engine == "hf"
    assert StudyArguments(eval_temperature=0.0).eval_config(1, trainer_engine=True).rollout_engine == "hf"
    assert StudyArguments(eval_rollout_engine="hf").eval_config(1, trainer_engine=True).rollout_engine == "hf"
    with pytest.raises(ValueError, match="eval_rollout_engine must be"):
        StudyArguments(eval_rollout_engine="vllm")
    with pytest.raises(ValueError, match="eval_temperature > 0"):
        StudyArguments(eval_rollout_engine="spark", eval_temperature=0.0)
