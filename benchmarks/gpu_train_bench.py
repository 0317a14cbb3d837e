"""Optimizer steps and evaluation throughput: plain TRL vs spark-trl on one GPU (issue 8 item 3), and the
condition A configuration on 1 vs N GPUs (issue 7 item 4). Run through ``gpu_rollout_bench.py train|eval`` or
directly:

    python benchmarks/gpu_train_bench.py train --out runs/bench/train.json
    python benchmarks/gpu_train_bench.py eval  --out runs/bench/eval.json
    python benchmarks/gpu_train_bench.py train --sampler_correction token_truncate --out runs/bench/train-tis.json
    accelerate launch --num_processes 2 benchmarks/gpu_train_bench.py multi

The reward is real where the machine allows it: each completion's code is extracted and run against the MBPP
tests in ``spark_trl.sandbox`` (falling back to a ``compile()`` check if the sandbox cannot start there). A
random-weight model writes no passing code, so every reward would be equal and every group would lack variance;
to give the trainers realistic work, half of the problems (by task id) get a deterministic per-completion jitter
(hash of the text, +-0.05): those groups have variance at once, the other half never does (adaptive groups top
them up to 8 and then leave them out of the loss). The same reward serves every trainer.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_common import (add_model_args, build_random_model, default_model_dir, memory_snapshot, versions,  # noqa: E402
                        write_json)


class BenchReward:
    """Sandboxed execution (or syntax) reward plus a deterministic jitter on half of the tasks; timed."""

    def __init__(self, use_sandbox=True, workers=8):
        self.__name__ = "bench_reward"
        self.seconds = 0.0
        self.completions = 0
        self.executor = None
        self.kind = "compile"
        if use_sandbox:
            try:
                from spark_trl.sandbox import Executor, Job

                ex = Executor(workers=workers, timeout=5.0)
                ok = ex.run([Job("def f(x):\n    return 2 * x", ["assert f(2) == 4"])])[0]
                if ok.status.value == "passed":
                    self.executor, self.kind = ex, "sandbox"
                else:
                    ex.close()
            except Exception as exc:  # noqa: BLE001 - the benchmark goes on with the syntax check
                print(f"sandbox unavailable ({type(exc).__name__}: {exc}); reward = compile() check", flush=True)

    def __call__(self, completions, task_id=None, tests=None, test_setup=None, entry_point=None, **kwargs):
        from spark_trl.prompts import extract_code

        t0 = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        codes = [extract_code(t, ep) for t, ep in zip(texts, entry_point or [None] * len(texts))]
        if self.executor is not None:
            from spark_trl.sandbox import Job

            jobs = [Job(code, list(ts), setup=su or "") for code, ts, su in
                    zip(codes, tests, test_setup or [""] * len(codes))]
            outcomes = self.executor.run(jobs)
            base = [_outcome_reward(o) for o in outcomes]
        else:
            base = []
            for code in codes:
                try:
                    compile(code, "<completion>", "exec")
                    base.append(0.0)
                except (SyntaxError, ValueError):
                    base.append(-0.2)
        rewards = []
        for r, text, tid in zip(base, texts, task_id or [""] * len(texts)):
            if int(hashlib.sha1(str(tid).encode()).hexdigest(), 16) % 2 == 0:
                r += (int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF - 0.5) * 0.1
            rewards.append(float(r))
        self.seconds += time.perf_counter() - t0
        self.completions += len(texts)
        return rewards


def _outcome_reward(outcome):
    """The study's partial reward from an ExecutionOutcome: fraction of tests passed, penalties otherwise."""
    status = outcome.status.value
    if status == "syntax_error":
        return -0.2
    if status == "timeout":
        return -0.3
    if outcome.passed:
        return outcome.passed / max(outcome.total, 1)
    return -0.1 if status == "runtime_error" else 0.0


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer:
    """Wall time of each optimizer step and of generation inside it."""

    def __init__(self):
        self.step_times, self.gen_s, self.gen_tokens, self.gen_calls = [], 0.0, 0, 0
        self._t = None

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync()
                timer.step_times.append(time.perf_counter() - timer._t)

        return _CB()

    def wrap(self, obj, name, count_tokens):
        fn = getattr(obj, name)

        def timed(*a, **kw):
            _sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            _sync()
            self.gen_s += time.perf_counter() - t0
            self.gen_calls += 1
            self.gen_tokens += count_tokens(out)
            return out

        setattr(obj, name, timed)


def _dataset(n_prompts, mbpp):
    from spark_trl.data import load_mbpp, split_mbpp, to_grpo_dataset

    return to_grpo_dataset(split_mbpp(load_mbpp(mbpp)).train[:n_prompts])


def _load_4bit(path):
    import torch
    from transformers import AutoModelForCausalLM

    from spark_trl.models import quantization_config

    if not torch.cuda.is_available():  # CPU smoke runs of the script: 4-bit with fp32 compute
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    quantization_config=quantization_config(True, "float32"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": torch.cuda.current_device()},
                                                quantization_config=quantization_config(True, "bfloat16"))


def run_trainer(kind, path, tok, opts, reward, steps, gens=(8, 8), per_device=8, grad_acc=4, engine=True):
    """One trainer for ``steps`` optimizer steps; returns its figures."""
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from spark_trl import SparkGRPOConfig, SparkGRPOTrainer
    from spark_trl.models import lora_config

    common = dict(output_dir=f"runs/bench/trainer-{kind}", max_steps=steps, per_device_train_batch_size=per_device,
                  gradient_accumulation_steps=grad_acc, learning_rate=5e-6, beta=0.02, temperature=1.0, top_p=0.98,
                  max_completion_length=opts.max_new_tokens, gradient_checkpointing=True, bf16=torch.cuda.is_available(),
                  use_cpu=not torch.cuda.is_available(),
                  logging_steps=1, report_to="none", save_strategy="no", seed=42, max_grad_norm=1.0,
                  epsilon=0.2, weight_decay=0.01, lr_scheduler_type="constant")
    if kind == "trl":
        args = GRPOConfig(num_generations=gens[0], **common)
        cls = GRPOTrainer
    else:
        # The sampler correction (TRL's vllm_importance_sampling_*) needs the fast engine's rollouts.
        correction = getattr(opts, "sampler_correction", "off")
        tis = {} if correction == "off" or not engine else dict(
            vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=correction,
            vllm_importance_sampling_clip_max=opts.sampler_clip_max)
        args = SparkGRPOConfig(min_generations=gens[0], max_generations=gens[1], generation_increment=2,
                               loss_type="spark", rollout_engine="spark" if engine else "trl", **tis, **common)
        cls = SparkGRPOTrainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = _load_4bit(path)
    timer = StepTimer()
    ds = _dataset(opts.n_prompts, opts.mbpp)
    reward.seconds, reward.completions = 0.0, 0
    trainer = cls(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                  peft_config=lora_config(), callbacks=[timer.callback()])
    init_s = time.perf_counter() - t0
    if kind == "trl":
        timer.wrap(trainer, "_generate_single_turn", lambda out: sum(len(c) for c in out[0]))
    elif getattr(trainer, "rollout_engine", None) is not None:
        timer.wrap(trainer.rollout_engine, "generate", lambda out: sum(len(c) for c in out))
    else:
        timer.wrap(trainer, "_generate_single_turn", lambda out: sum(len(c) for c in out[0]))
    from spark_trl.profiling import StepProfiler

    profiler = StepProfiler().attach(trainer)  # the time split per phase (issue 15), after the timer's wrapping
    trainer.train()
    _sync()
    st = timer.step_times
    steady = st[1:] if len(st) > 1 else st
    res = {"trainer": kind, "gens": list(gens), "per_device_train_batch_size": per_device,
           "gradient_accumulation_steps": grad_acc, "steps": len(st), "init_s": round(init_s, 1),
           "step_s": [round(x, 2) for x in st], "mean_step_s_after_first": round(sum(steady) / len(steady), 2),
           "generation_s": round(timer.gen_s, 2), "generation_calls": timer.gen_calls,
           "completion_tokens": timer.gen_tokens,
           "completion_tokens_per_gen_s": round(timer.gen_tokens / max(timer.gen_s, 1e-9), 1),
           "reward_s": round(reward.seconds, 2), "reward_kind": reward.kind, "completions": reward.completions,
           "total_step_s": round(sum(st), 2), **memory_snapshot()}
    res["training_s"] = round(res["total_step_s"] - res["generation_s"] - res["reward_s"], 2)
    res["phases_s_per_step"] = {k: round(v, 3) for k, v in profiler.summary().items()}
    print(f"{kind}: seconds per step by phase (after the first step)\n{profiler.table()}", flush=True)
    res["completion_tokens_per_step_s"] = round(timer.gen_tokens / max(sum(st), 1e-9), 1)
    if hasattr(trainer, "spark_stats_history") and trainer.spark_stats_history:
        res["spark_stats"] = trainer.spark_stats_history[-1]
    if kind == "spark":
        res["sampler_correction"] = getattr(opts, "sampler_correction", "off") if engine else "off"
        res["sampling_metrics"] = sampling_metrics(trainer.state.log_history)
    eng = getattr(trainer, "rollout_engine", None)
    if eng is not None:
        res["engine_active"] = eng.active
        res["engine_fallback_reason"] = eng.fallback_reason
        res["engine_stats"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in eng.stats.items()}
        try:  # sampler/trainer mismatch on a fresh batch, after the optimizer steps (LoRA moved)
            from spark_trl.rollout import completion_logprobs, logprob_mismatch

            m = trainer.accelerator.unwrap_model(trainer.model)
            eng.sync_weights(m)
            from spark_trl.trl_private import tokenize_prompts

            prompt_ids = tokenize_prompts(trainer, [ds[i]["prompt"] for i in range(8)])
            comps = eng.generate([list(p) for p in prompt_ids])
            was = m.training
            m.eval()
            ref = completion_logprobs(m, [list(p) for p in prompt_ids], comps, temperature=1.0, batch_size=8)
            m.train(was)
            res["mismatch_after_training"] = logprob_mismatch(eng.last_logprobs, ref)
        except Exception as exc:  # noqa: BLE001
            res["mismatch_after_training"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(res), flush=True)
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def sampling_metrics(log_history) -> dict:
    """The trainer's in-training sampler/trainer gap (TRL's `sampling/sampling_logp_difference/*` and, with the
    correction, `sampling/importance_sampling_ratio/*`), averaged over the logged steps (max and min: extremes).
    Logged on steps whose rollout computed old log-probs: always with the correction on; without it only when a
    rollout outlives an optimizer step (here it does not: `mismatch_after_training` measures the gap then).

    Example:
        >>> sampling_metrics([{"sampling/sampling_logp_difference/mean": 0.03}, {"loss": 1.0},
        ...                   {"sampling/sampling_logp_difference/mean": 0.05}])
        {'sampling/sampling_logp_difference/mean': 0.04}
    """
    values: dict = {}
    for entry in log_history:
        for k, v in entry.items():
            if k.startswith("sampling/"):
                values.setdefault(k, []).append(float(v))
    out = {}
    for k, vs in sorted(values.items()):
        out[k] = max(vs) if k.endswith("/max") else min(vs) if k.endswith("/min") else round(sum(vs) / len(vs), 6)
    return out


def train(opts):
    from transformers import AutoTokenizer

    path = build_random_model(opts.model_dir, opts.tokenizer, opts.shape)
    tok = AutoTokenizer.from_pretrained(path)
    reward = BenchReward(use_sandbox=not opts.no_sandbox)
    report = {"mode": "train", "versions": versions(), "reward": reward.kind, "runs": []}
    plan = [("spark", opts.spark_steps, (8, 8), 8), ("spark", opts.spark_steps, (4, 8), 4),
            ("trl", opts.trl_steps, (8, 8), 8)]
    plan = [run for run in plan if run[1] > 0]  # --trl_steps 0: spark runs only (0 would mean a whole epoch)
    for kind, steps, gens, per_device in plan:
        try:
            report["runs"].append(run_trainer(kind, path, tok, opts, reward, steps, gens, per_device))
        except Exception as exc:  # noqa: BLE001 - keep the other runs' figures
            import traceback

            traceback.print_exc()
            report["runs"].append({"trainer": kind, "gens": list(gens), "error": f"{type(exc).__name__}: {exc}"})
        write_json(report, opts.out)
    print("\n| trainer | gens | s/step (after 1st) | 1st step s | gen s | reward s | train s | tok/s (gen) | "
          "peak alloc/reserved GiB |")
    for r in report["runs"]:
        print(f"| {r['trainer']} | {r['gens']} | {r.get('mean_step_s_after_first')} | {(r.get('step_s') or [None])[0]} | "
              f"{r.get('generation_s')} | {r.get('reward_s')} | {r.get('training_s')} | "
              f"{r.get('completion_tokens_per_gen_s')} | {r.get('peak_allocated_gib')}/{r.get('peak_reserved_gib')} |"
              f" {r.get('error', '')}")
    if reward.executor is not None:
        reward.executor.close()
    return report


def evaluate(opts):
    """HumanEval 164x5 + MBPP-held 100x5 at T 0.2 / top_p 0.95 / 512: the engine on a subset, plain
    evaluation.generate on a smaller one; both extrapolated to the full 1,320 sequences (random weights: every
    sequence runs to 512 tokens)."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer

    from spark_trl.data import load_humaneval, load_mbpp, split_mbpp
    from spark_trl.evaluation import EvalConfig, chat_prompts, generate
    from spark_trl.rollout import FastRolloutEngine

    path = build_random_model(opts.model_dir, opts.tokenizer, opts.shape)
    tok = AutoTokenizer.from_pretrained(path)
    model = _load_4bit(path)
    from peft import get_peft_model

    from spark_trl.models import lora_config

    model = get_peft_model(model, lora_config()).eval()
    problems = load_humaneval(opts.humaneval) + split_mbpp(load_mbpp(opts.mbpp)).heldout
    texts = chat_prompts(tok, problems)
    total_seqs = len(texts) * 5
    report = {"mode": "eval", "versions": versions(), "problems": len(problems), "sequences": total_seqs}
    # spark-trl: the engine, one row per sample, in chunks of max_batch_size.
    args = SimpleNamespace(temperature=0.2, top_p=0.95, top_k=50, min_p=None, repetition_penalty=1.0,
                           max_completion_length=opts.max_new_tokens, generation_kwargs=None)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows = [i for i in range(len(ids)) for _ in range(5)]
    sub = rows[:opts.eval_engine_seqs]
    memory_snapshot(reset=True)
    eng = FastRolloutEngine(model, tok, args, max_batch_size=opts.eval_batch, fallback=False)
    eng.generate([ids[i] for i in sub[:opts.eval_batch]])  # warm-up / capture
    _sync()
    t0 = time.perf_counter()
    comps = eng.generate([ids[i] for i in sub])
    _sync()
    dt = time.perf_counter() - t0
    n_tok = sum(map(len, comps))
    report["spark_engine"] = {"sequences": len(sub), "batch": opts.eval_batch, "seconds": round(dt, 2),
                              "completion_tokens": n_tok, "tokens_per_s": round(n_tok / dt, 1),
                              "sequences_per_s": round(len(sub) / dt, 2),
                              "extrapolated_full_s": round(dt * total_seqs / len(sub), 1), **memory_snapshot()}
    print(report["spark_engine"], flush=True)
    del eng
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    # plain: spark_trl.evaluation.generate (batched HF generate), a subset with a shorter cap, per-token rate.
    cfg = EvalConfig(n_samples=1, temperature=0.2, top_p=0.95, max_new_tokens=opts.eval_plain_tokens,
                     batch_size=opts.eval_batch, progress=False)
    plain_texts = [texts[i] for i in rows[:opts.eval_batch]]
    _sync()
    t0 = time.perf_counter()
    outs = generate(model, tok, plain_texts, cfg)
    _sync()
    dt = time.perf_counter() - t0
    n_tok = sum(len(tok(o[0], add_special_tokens=False)["input_ids"]) for o in outs)
    seqs_tok = len(plain_texts) * opts.eval_plain_tokens
    rate = seqs_tok / dt  # every sequence ran to the cap (random weights): tokens = sequences x cap
    report["plain_generate"] = {"sequences": len(plain_texts), "max_new_tokens": opts.eval_plain_tokens,
                                "batch": opts.eval_batch, "seconds": round(dt, 2), "tokens_per_s": round(rate, 1),
                                "decoded_tokens_counted": n_tok,
                                "extrapolated_full_s": round(total_seqs * opts.max_new_tokens / rate, 1)}
    report["speedup"] = round(report["spark_engine"]["tokens_per_s"] / rate, 1)
    print(report["plain_generate"], "speedup", report["speedup"], flush=True)
    write_json(report, opts.out)
    return report


def multi(opts):
    """Condition A (adaptive 4-8, per-device batch 4, grad accumulation 4, the spark engine) for a few steps on
    however many processes ``accelerate launch`` started; rank 0 prints throughput and every rank its peak memory."""
    import torch
    from accelerate import PartialState
    from transformers import AutoTokenizer

    state = PartialState()
    if torch.cuda.is_available():
        torch.cuda.set_device(state.local_process_index)
    path = opts.model_dir or default_model_dir(opts.shape)
    if state.is_main_process:
        build_random_model(path, opts.tokenizer, opts.shape)
    state.wait_for_everyone()
    tok = AutoTokenizer.from_pretrained(path)
    reward = BenchReward(use_sandbox=not opts.no_sandbox, workers=max(2, 8 // state.num_processes))
    res = run_trainer("spark", path, tok, opts, reward, opts.spark_steps, (4, 8), 4)
    res["rank"], res["world_size"] = state.process_index, state.num_processes
    res["device_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    gathered = [None] * state.num_processes
    if state.num_processes > 1:
        torch.distributed.all_gather_object(gathered, res)
    else:
        gathered = [res]
    if state.is_main_process:
        steady = gathered[0]["mean_step_s_after_first"]
        prompts_per_step = 4 * state.num_processes  # per rank: 4 x 4 / 4 initial completions per prompt
        out = {"world_size": state.num_processes, "mean_step_s_after_first": steady,
               "prompts_per_s": round(prompts_per_step / steady, 3),
               "completions_total": sum(g["completions"] for g in gathered),
               "peak_allocated_gib_per_rank": [g.get("peak_allocated_gib") for g in gathered],
               "peak_reserved_gib_per_rank": [g.get("peak_reserved_gib") for g in gathered],
               "runs": gathered, "versions": versions()}
        print("MULTI", json.dumps({k: v for k, v in out.items() if k != "runs"}), flush=True)
        write_json(out, opts.out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["train", "eval", "multi"])
    add_model_args(p)
    p.add_argument("--out", default=None)
    p.add_argument("--n_prompts", type=int, default=64)
    p.add_argument("--spark_steps", type=int, default=4)
    p.add_argument("--trl_steps", type=int, default=1)
    p.add_argument("--no_sandbox", action="store_true")
    p.add_argument("--sampler_correction", default="off",
                   choices=["off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"],
                   help="the spark runs' vllm_importance_sampling_mode (off: no correction, the study's setting); "
                        "every spark run reports the logged sampler/trainer gap in sampling_metrics")
    p.add_argument("--sampler_clip_max", type=float, default=3.0, help="vllm_importance_sampling_clip_max")
    p.add_argument("--humaneval", default=None)
    p.add_argument("--eval_engine_seqs", type=int, default=256)
    p.add_argument("--eval_batch", type=int, default=64)
    p.add_argument("--eval_plain_tokens", type=int, default=24)
    return p.parse_args(argv)


def main(opts=None):
    """``opts``: an argv list, a parsed namespace, or None (the command line)."""
    if not isinstance(opts, argparse.Namespace):
        opts = parse_args(opts)
    {"train": train, "eval": evaluate, "multi": multi}[opts.mode](opts)


if __name__ == "__main__":
    main()
