"""Two CPU processes (torchrun, gloo): SparkGRPOTrainer's adaptive groups and the sharded evaluation under DDP, and
the same training runs with the model sharded by FSDP2 (see the FSDP section at the end).

One launch of tests/_dist_worker.py trains the tiny model for two optimizer steps with ranks that need different
top-ups (rank 0 has nothing at all in the loss in step 1) and an auxiliary phase with different numbers of
examples per rank (then again with the auxiliary loss joint and two optimizer steps per generation), evaluates a few problems sharded over the two ranks,
and runs recipes/condition_a.py's study (2 tiny iterations) end to end. The tests check the ranks' reports: no hang, identical parameters, the same number of forward/backward
passes, and logged metrics that are the global values (worked out below from the deterministic reward), not
either rank's own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_dist_worker.py")
LAUNCH_TIMEOUT = 300  # seconds; a rank stuck in a collective would otherwise hang CI
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}

# Per task kind (see _dist_worker.TASKS): final group size, sum of the group's rewards, whether it is in the loss.
# 'vary' rewards are 0,1,0,1; 'late' gets 0,0,0,0 then 0,1 in its top-up; 'flat' 0 x 8.
KIND = {"flat": (8, 0.0, False), "vary": (4, 2.0, True), "late": (6, 1.0, True)}
STEPS = [["flat1", "flat2", "vary1", "late1"], ["vary2", "late2", "flat3", "vary3"]]  # rank 0: first two


def _expected(groups: list[str]) -> dict[str, float]:
    sizes = [KIND[g[:4]][0] for g in groups]
    reward = sum(KIND[g[:4]][1] for g in groups)
    in_loss = sum(KIND[g[:4]][0] for g in groups if KIND[g[:4]][2])
    flat = sum(not KIND[g[:4]][2] for g in groups)
    n = len(groups)
    return {
        "spark/group_size_mean": sum(sizes) / n,
        "spark/frac_groups_topped_up": sum(s > 4 for s in sizes) / n,
        "spark/frac_groups_without_variance": flat / n,
        "frac_reward_zero_std": flat / n,
        "spark/completions": sum(sizes),
        "spark/frac_sequences_in_loss": in_loss / sum(sizes),
        "reward": reward / sum(sizes),
        "rewards/prompt_keyed/mean": reward / sum(sizes),
    }


def _launch(modes: str, model_path: str, out: Path, mbpp_path) -> None:
    env = {**os.environ, "SPARK_TRL_MBPP": str(mbpp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           modes, model_path, str(out)]
    # Own session, so that on a timeout the launcher and both ranks are killed together.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"2-process run did not finish in {LAUNCH_TIMEOUT} s (a rank hung?)\n{log[-4000:]}")
    assert proc.returncode == 0, f"2-process run failed ({proc.returncode})\n{log[-6000:]}"


@pytest.fixture(scope="module")
def reports(tiny_model_path, tmp_path_factory, mbpp_path):
    out = tmp_path_factory.mktemp("dist")
    _launch("train,train_joint,train_epoch,aux_caps,eval,recipe", tiny_model_path, out, mbpp_path)
    load = json.loads
    return {
        "train": [load((out / f"rank{r}.json").read_text()) for r in (0, 1)],
        "joint": [load((out / f"rank{r}_joint.json").read_text()) for r in (0, 1)],
        "epoch": [load((out / f"rank{r}_epoch.json").read_text()) for r in (0, 1)],
        "aux_caps": [load((out / f"aux_caps_rank{r}.json").read_text()) for r in (0, 1)],
        "eval": [load((out / f"eval_rank{r}.json").read_text()) for r in (0, 1)],
        "samples": [load(line) for line in (out / "heldout.samples.jsonl").read_text().splitlines()],
        "run": out / "run",
        "dir": out,
    }


def test_ranks_with_different_top_ups_finish_in_lockstep(reports):
    r0, r1 = reports["train"]
    assert (r0["world"], r0["backend"]) == (2, "gloo")
    # The arrangement really gives the ranks different top-ups: rank 0 tops up twice in step 1 and once in step 2,
    # rank 1 once then twice; each top-up scores only that rank's groups without variance.
    assert r0["reward_calls"] == [["flat1"] * 4 + ["flat2"] * 4, ["flat1"] * 2 + ["flat2"] * 2,
                                  ["flat1"] * 2 + ["flat2"] * 2, ["vary2"] * 4 + ["late2"] * 4, ["late2"] * 2]
    assert r1["reward_calls"] == [["vary1"] * 4 + ["late1"] * 4, ["late1"] * 2, ["flat3"] * 4 + ["vary3"] * 4,
                                  ["flat3"] * 2, ["flat3"] * 2]
    # Same number of forwards and backwards on both ranks: 2 optimizer steps x 2 accumulation micro-steps, although
    # rank 0 has no sequence in the loss in step 1 and rank 1 has 10; then 3 auxiliary steps, although rank 0 has
    # 3 examples (2 batches) and rank 1 has 5 (3 batches).
    for r in (r0, r1):
        assert (r["global_step"], r["micro_steps"], r["forward"], r["backward"]) == (2, 4, 7, 7)
    # The reference forwards (no gradient) too, step by step, although rank 0 has 0 sequences in step 1 and 10 in
    # step 2, rank 1 the reverse: ceil(10 / 4) = 3 chunks of per_device_train_batch_size rows on both, each step
    # (under FSDP every forward gathers parameters collectively: an uneven count would hang).
    assert r0["nograd_by_step"] == r1["nograd_by_step"] == {"0": 3, "1": 3}
    # DDP kept the replicas identical, after the GRPO steps and after the auxiliary phase, which moved them too.
    assert r0["param_digest_before"] == r1["param_digest_before"]
    assert r0["param_digest_before_aux"] == r1["param_digest_before_aux"]
    assert r0["param_digest"] == r1["param_digest"]
    assert r0["moved"] and r1["moved"]
    assert r0["param_digest"] != r0["param_digest_before_aux"] != r0["param_digest_before"]


def test_joint_auxiliary_loss_two_steps_per_generation_and_prefetched_top_ups(reports):
    """aux_mode='joint' with steps_per_generation=2 and no accumulation: every micro-step is an optimizer step and
    the second one over a rollout uses cached old log-probs; top_up_mode='prefetch' samples max_generations per
    prompt in one round (a collective call on every rank) and reveals top-ups from the spares. The ranks'
    auxiliary batches differ (rank 0 has none for the first rollout), yet both run one auxiliary forward per
    micro-step (a weight-0 dummy example on a rank without any: under FSDP a forward is collective), the same
    backward passes, log the same values and end with identical parameters."""
    r0, r1 = reports["joint"]
    # The reward sees the same groups and top-ups as with generation rounds.
    assert r0["reward_calls"] == reports["train"][0]["reward_calls"]
    assert r1["reward_calls"] == reports["train"][1]["reward_calls"]
    steps = [h for h in r0["log_history"] if "spark/completions" in h]
    assert [h["spark/completions"] for h in steps] == [26, 22]
    assert all(h["spark/generated_tokens"] > h["spark/completion_tokens"] for h in steps)  # the unused spares
    assert (r0["global_step"], r0["micro_steps"], r0["backward"]) == (r1["global_step"], r1["micro_steps"],
                                                                      r1["backward"]) == (4, 4, 4)
    assert (r0["forward"], r1["forward"]) == (4 + 4, 4 + 4)  # GRPO forwards + joint auxiliary forwards
    assert r0["nograd_by_step"] == r1["nograd_by_step"]
    assert r0["param_digest"] == r1["param_digest"] and r0["moved"]
    for a, b in zip(r0["log_history"], r1["log_history"]):
        assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == {
            k: v for k, v in b.items() if k not in TIMING_KEYS}
    ratios = [h["ratio_mean"] for h in r0["log_history"] if "ratio_mean" in h]
    assert ratios[0] == ratios[2] == 1.0 and ratios[1] != 1.0 and ratios[3] != 1.0  # fresh vs cached old log-probs
    epoch = r0["spark_stats"][-1]
    assert epoch["aux_examples"] == {"reflection": 8} and epoch["aux_steps"] == 4
    assert epoch["group_sizes"] == {"4": 3, "6": 2, "8": 3} and epoch["sequences_in_loss"] == 24


def test_first_step_gradient_is_one_process_gradient_over_all_sequences(reports, tiny_model_path):
    """The all-reduced gradient of step 1 equals, in one process, the gradient of the study's loss averaged over
    the 10 sequences in the loss of both ranks (rank 0 has none, rank 1 all 10): the loss is normalised by the
    global sequence count, not per rank (which would halve it here), and padding rows contribute nothing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from spark_trl.trainer import spark_policy_loss

    saved = [torch.load(reports["dir"] / f"rank{r}.pt") for r in (0, 1)]
    assert saved[0]["grads"].keys() == saved[1]["grads"].keys()
    for name, g in saved[0]["grads"].items():
        assert torch.equal(g, saved[1]["grads"][name])
    assert [float(s["batch"]["seq_weight"].sum()) for s in saved] == [0.0, 10.0]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved[0]["init"].items():
            params[name].copy_(value)
    model.train()
    loss = 0.0
    for s in saved:
        b = s["batch"]
        t = b["completion_ids"].size(1)
        logits = model(input_ids=torch.cat([b["prompt_ids"], b["completion_ids"]], 1),
                       attention_mask=torch.cat([b["prompt_mask"], b["completion_mask"]], 1)).logits[:, -t - 1:-1]
        logps = torch.log_softmax(logits.float(), -1).gather(-1, b["completion_ids"].unsqueeze(-1)).squeeze(-1)
        per_seq, _, _ = spark_policy_loss(logps, logps.detach(), b["ref_per_token_logps"], b["advantages"],
                                          b["completion_mask"] * b["tool_mask"], 0.2, 0.2, 0.02)
        loss = loss + (per_seq * b["seq_weight"]).sum()
    (loss / 10).backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert reference.keys() == saved[0]["grads"].keys()
    norm = torch.sqrt(sum((g ** 2).sum() for g in reference.values()))
    assert norm > 0
    for name, g in reference.items():
        torch.testing.assert_close(saved[0]["grads"][name], g, rtol=1e-4, atol=1e-6 * float(norm))
    logged = [h["grad_norm"] for h in reports["train"][0]["log_history"] if "grad_norm" in h][0]
    assert logged == pytest.approx(float(norm), rel=1e-4)


def test_logged_group_statistics_are_global(reports):
    r0, r1 = reports["train"]
    # Every logged value is the same on both ranks (timings aside), the epoch summary included.
    assert len(r0["log_history"]) == len(r1["log_history"])
    for a, b in zip(r0["log_history"], r1["log_history"]):
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == {
            k: v for k, v in b.items() if k not in TIMING_KEYS}
    assert r0["spark_stats"] == r1["spark_stats"]

    steps = [h for h in r0["log_history"] if "spark/group_size_mean" in h]
    assert len(steps) == 2
    for logged, groups in zip(steps, STEPS):
        expected = _expected(groups)
        assert {k: logged[k] for k in expected} == pytest.approx(expected)
        # ... and not what either rank would have computed from its own groups.
        for half in (groups[:2], groups[2:]):
            local = _expected(half)
            assert any(local[k] != pytest.approx(expected[k]) for k in expected)

    epoch = r0["spark_stats"][-1]
    assert epoch["group_sizes"] == {"4": 3, "6": 2, "8": 3}
    assert epoch["rollouts"] == 48
    assert epoch["sequences_in_loss"] == 24
    assert epoch["frac_groups_topped_up"] == pytest.approx(5 / 8)
    assert epoch["frac_groups_without_variance"] == pytest.approx(3 / 8)
    assert epoch["mean_reward"] == pytest.approx(8 / 48)
    # beta > 0: the reference forward covers exactly the sequences in the loss, counted over both ranks.
    assert epoch["ref_forward_sequences"] == 24
    # The auxiliary phase: 3 + 5 examples, 3 optimizer steps (the most any rank needs).
    assert epoch["aux_examples"] == {"reflection": 8}
    assert epoch["aux_steps"] == 3


def test_evaluation_is_sharded_and_gathered(reports):
    e0, e1 = reports["eval"]
    # Each rank generated only its shard (problems 0, 2, 4 and 1, 3; 2 samples each) ...
    assert (e0["generated"], e1["generated"]) == (6, 4)
    # ... and both hold every problem's record, so pass@k is computed once over all samples: 2 of 5 problems pass
    # (rank 0's shard alone would give 2/3, rank 1's 0).
    assert e0["per_problem"] == e1["per_problem"]
    assert [p["task_id"] for p in e0["per_problem"]] == e0["task_ids"]
    assert [(p["n"], p["c"]) for p in e0["per_problem"]] == [(2, 2), (2, 0), (2, 2), (2, 0), (2, 0)]
    assert e0["pass_at"] == e1["pass_at"] == {"1": pytest.approx(0.4), "2": pytest.approx(0.4)}
    # The samples file is written once (by rank 0), with every sample of every problem.
    samples = reports["samples"]
    assert sorted((s["task_id"], s["sample"]) for s in samples) == [(t, j) for t in e0["task_ids"] for j in (0, 1)]


def test_recipe_study_runs_on_two_processes(reports):
    run = reports["run"]
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]  # written once (rank 0), one row per iteration
    for r in rows[1:]:
        # 4 problems, one group per rank and step: 4 groups per iteration over both ranks (one rank has 2).
        assert sum(r["group_sizes"].values()) == 4
        assert r["train_rollouts"] == sum(int(k) * v for k, v in r["group_sizes"].items())
        assert 2 <= r["mean_group_size"] <= 4
    for name in ("iter1", "iter2", "last"):
        ck = run / "checkpoints" / name
        # The adapter once, and every rank's RNG state, for an exact resume on 2 processes.
        assert (ck / "adapter_model.safetensors").is_file() and (ck / "optimizer.pt").is_file()
        assert (ck / "rng_state_0.pth").is_file() and (ck / "rng_state_1.pth").is_file()
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "best" / "adapter_model.safetensors").is_file()
    for it in (0, 1, 2):
        for bench in ("humaneval", "mbpp-heldout"):
            lines = (run / "eval" / f"iter{it}" / f"{bench}.samples.jsonl").read_text().splitlines()
            samples = sorted((json.loads(x)["task_id"], json.loads(x)["sample"]) for x in lines)
            assert len(samples) == 6 and len({t for t, _ in samples}) == 3  # 3 problems x 2 samples, once each


def test_epoch_schedule_with_uneven_ranks_stays_in_lockstep(reports):
    """rollout_schedule="epoch" over 7 problems: rank 0 gets 4 (14 sequences in the loss), rank 1 gets 3 (10).
    Both sample their whole epoch before the first optimizer step, then run the same 4 optimizer steps (rank 1's
    last one on padding rows), the same forwards (reference and old log-probs included) and backwards, and end
    with identical parameters and statistics."""
    r0, r1 = reports["epoch"]
    for r in (r0, r1):
        assert r["calls_before_first_step"] == len(r["reward_calls"])  # all rollouts first
    seen = sorted({t for r in (r0, r1) for call in r["reward_calls"] for t in call})
    assert seen == sorted(["vary1", "flat1", "late1", "vary2", "flat2", "late2", "vary3"])
    assert r0["spark_stats"] == r1["spark_stats"]
    epoch = r0["spark_stats"][-1]
    assert (epoch["sequences_in_loss"], epoch["optimizer_steps"]) == (24, 4)
    assert (r0["micro_steps"], r0["forward"], r0["backward"]) == (r1["micro_steps"], r1["forward"], r1["backward"])
    assert r0["forward"] == 8 and r0["nograd_by_step"] == r1["nograd_by_step"]
    assert r0["global_step"] == r1["global_step"] and r0["param_digest"] == r1["param_digest"] and r0["moved"]


def test_auxiliary_caps_hold_over_all_processes(reports):
    """A cap of 5 reflection examples with 6 candidates on rank 0 and 2 on rank 1: 5 in all, every build."""
    r0, r1 = reports["aux_caps"]
    assert (r0["candidates"], r1["candidates"]) == (6, 2)
    assert [a + b for a, b in zip(r0["kept"], r1["kept"])] == [5, 5, 5]


# ------------------------------------------------------------------------------------------------------------ FSDP
# The same three training runs (train, train_joint, train_epoch) with the model sharded by FSDP2 on the two CPU
# processes: the worker gives SparkGRPOConfig fsdp="full_shard" with fsdp_config version 2 (each Qwen2DecoderLayer
# and the root sharded) and lets accelerate use its FSDP path on CPU (_dist_worker.enable_fsdp_on_cpu: accelerate
# 1.15 would otherwise run an FSDP config as DDP there). Under FSDP every forward all-gathers the parameters and
# every synchronising backward reduce-scatters the gradients, collectively: a rank that ran one forward more or
# fewer than the other would hang both (benchmarks/fsdp_cpu_check.py shows it, test_uneven_forwards_hang_fsdp).
FSDP_RUNS = {"train": "_fsdp", "joint": "_joint_fsdp", "epoch": "_epoch_fsdp"}


@pytest.fixture(scope="module")
def fsdp_reports(tiny_model_path, tmp_path_factory, mbpp_path):
    out = tmp_path_factory.mktemp("fsdp")
    _launch("train_fsdp,train_joint_fsdp,train_epoch_fsdp", tiny_model_path, out, mbpp_path)
    return {run: [json.loads((out / f"rank{r}{suffix}.json").read_text()) for r in (0, 1)]
            for run, suffix in FSDP_RUNS.items()} | {"dir": out}


def test_fsdp_really_shards_the_model_on_cpu(fsdp_reports, reports):
    """The trainer's prepared model is an FSDP2 module whose every parameter is a DTensor sharded over the two ranks:
    each rank stores half of the model's elements (DDP, for contrast, keeps a whole replica per rank)."""
    for run in FSDP_RUNS:
        r0, r1 = fsdp_reports[run]
        for r in (r0, r1):
            assert (r["world"], r["backend"], r["distributed_type"]) == (2, "gloo", "DistributedType.FSDP")
            assert r["fsdp_module"] and r["wrapper"].startswith("FSDP")
            assert r["sharded_params"] == r["dtensor_params"] == r["params"] > 0
            assert r["local_numel"] < r["full_numel"]
        assert r0["local_numel"] + r1["local_numel"] == r0["full_numel"]
    ddp = reports["train"][0]
    assert (ddp["distributed_type"], ddp["fsdp_module"], ddp["sharded_params"]) == ("DistributedType.MULTI_CPU",
                                                                                   False, 0)
    assert ddp["local_numel"] == ddp["full_numel"] == fsdp_reports["train"][0]["full_numel"]


def test_fsdp_ranks_with_uneven_work_run_the_same_forwards_and_collectives(fsdp_reports, reports):
    """The uneven cases of the DDP runs, under FSDP: rank 0 has nothing in the loss in step 1 (train), no auxiliary
    example for the first rollout (joint), 14 sequences against rank 1's 10 (epoch). The runs finish (the launch
    fails the test after LAUNCH_TIMEOUT instead of hanging), and both ranks run the same forwards with and without
    a graph, step by step, the same backwards, and issue the same number of parameter all-gathers and gradient
    reduce-scatters (generation included), the very counts of the DDP runs."""
    for run in FSDP_RUNS:
        r0, r1 = fsdp_reports[run]
        d0, d1 = reports[run]
        assert (r0["reward_calls"], r1["reward_calls"]) == (d0["reward_calls"], d1["reward_calls"])  # same work
        keys = ("global_step", "micro_steps", "forward", "backward", "nograd_by_step", "all_gathers",
                "reduce_scatters")
        assert {k: r0[k] for k in keys} == {k: r1[k] for k in keys}
        assert r0["all_gathers"] > 0 and r0["reduce_scatters"] > 0
        assert {k: r0[k] for k in keys[:5]} == {k: d0[k] for k in keys[:5]} == {k: d1[k] for k in keys[:5]}
    assert (fsdp_reports["train"][0]["forward"], fsdp_reports["train"][0]["backward"]) == (7, 7)
    assert fsdp_reports["train"][0]["nograd_by_step"] == {"0": 3, "1": 3}
    assert fsdp_reports["joint"][0]["forward"] == 4 + 4  # GRPO forwards + joint auxiliary forwards
    assert fsdp_reports["epoch"][0]["forward"] == 8


def test_fsdp_training_equals_ddp_training(fsdp_reports, reports):
    """Sharded or replicated, the same run: the first step's gradient and the final parameters (gathered whole
    from the shards) equal DDP's, and every logged value is DDP's (timings aside; the gradient norm, which FSDP
    computes from the shards, to float precision)."""
    import torch

    for run, suffix in FSDP_RUNS.items():
        ddp_suffix = suffix.replace("_fsdp", "")
        for r in (0, 1):
            fsdp = torch.load(fsdp_reports["dir"] / f"rank{r}{suffix}.pt")
            ddp = torch.load(reports["dir"] / f"rank{r}{ddp_suffix}.pt")
            for key in ("init", "final", "grads"):
                assert fsdp[key].keys() == ddp[key].keys()
                for name, value in ddp[key].items():
                    torch.testing.assert_close(fsdp[key][name], value)
            assert any(not torch.equal(ddp["final"][n], ddp["init"][n]) for n in ddp["init"])
            logs = [fsdp_reports[run][r]["log_history"], reports[run][r]["log_history"]]
            assert len(logs[0]) == len(logs[1])
            for a, b in zip(*logs):
                assert a.keys() == b.keys()
                skip = TIMING_KEYS | {"grad_norm"}
                assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
                if "grad_norm" in b:
                    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
            assert fsdp_reports[run][r]["spark_stats"] == reports[run][r]["spark_stats"]


def _fsdp_check(case: str, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "fsdp_cpu_check.py"), "--case", case,
           "--timeout", str(timeout)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout + 240)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_uneven_forwards_hang_fsdp_on_cpu():
    """The check the FSDP tests above rest on: with torch's FSDP2 on two CPU processes (gloo), the same forwards
    on both ranks finish; one extra no-grad forward on rank 0 blocks both ranks until gloo's timeout (10 s here)."""
    even = _fsdp_check("even", 120)
    assert even["finished"] and all(r["fsdp_module"] and r["sharded_params"] == r["params"] for r in even["ranks"])
    uneven = _fsdp_check("uneven", 10)
    assert not uneven["finished"]
    assert [r["rank"] for r in uneven["ranks"]] == [0, 1]
    # Both timed out where expected, after the sharded training step: rank 0 in its extra forward's all-gather,
    # rank 1 at the next collective.
    assert [r["stage"] for r in uneven["ranks"]] == ["2 no-grad forward(s)", "barrier"], uneven
    assert all("Timed out" in r["error"] and "loss" in r for r in uneven["ranks"]), uneven
