"""GPU benchmark of spark-trl's fast rollouts against plain TRL generation (issue 8).

Modes (each measures spark-trl and its baseline in the same run, on the same prompts and model):

* ``calibrate``: generation only. Plain ``model.generate`` on the 4-bit model with its LoRA (TRL's transformers
  path, a few dozen steps, per-step time extrapolated to the full length) against ``FastRolloutEngine`` variants
  (LoRA separate/merged, top-p prefilter/bisection/sort, batch 32/64) for 32 sequences x 512 tokens at the
  training's sampling (T 1.0, top_p 0.98) and the evaluation's (T 0.2, top_p 0.95, top_k 50 as transformers'
  default adds); the sampler/trainer log-prob mismatch; peak memory.
* ``train``: optimizer steps of plain ``trl.GRPOTrainer`` vs ``SparkGRPOTrainer`` (rollout_engine="spark", fixed 8
  generations and adaptive 4-8): seconds per step, completion tokens/s, time split, peak memory.
* ``eval``: evaluation throughput (HumanEval 164x5 + MBPP-held 100x5 at T 0.2 / top_p 0.95 / 512 tokens).

    python benchmarks/gpu_rollout_bench.py calibrate --out runs/bench/calibrate.json
    python benchmarks/gpu_rollout_bench.py calibrate --shape tiny   # CPU smoke run of the script itself

The model has Qwen2.5-Coder-3B-Instruct's architecture and random weights (no hub on the GPU machine): random
weights almost never emit EOS, so every completion runs to the 512-token cap (the worst case for generation).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_common import (add_model_args, build_random_model, load_qlora, mbpp_chat_prompt_ids,  # noqa: E402
                        memory_snapshot, versions, write_json)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_generate_rate(model, tokenizer, prompts, new_tokens, temperature, top_p, top_k=0):
    """TRL's transformers path (left-padded generate on the training model), ``new_tokens`` steps, timed."""
    import torch
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                           temperature=temperature, top_p=top_p, top_k=top_k, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=[eos], disable_compile=True)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    model.eval()
    with torch.no_grad():
        # Warm-up long enough for the GPU clocks and the kernels' first-use costs (the first timed call of the
        # previous version ran 257 ms/step against 119 ms/step a minute later).
        short = GenerationConfig(**{**cfg.to_dict(), "max_new_tokens": 16, "min_new_tokens": 16})
        model.generate(input_ids=ids, attention_mask=mask, generation_config=short)  # warm-up
        _sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        _sync()
        dt = time.perf_counter() - t0
    n_new = out.shape[1] - width
    return {"batch": len(prompts), "new_tokens": n_new, "seconds": round(dt, 3),
            "ms_per_step": round(1000 * dt / n_new, 2), "tokens_per_s": round(len(prompts) * n_new / dt, 1)}


def engine_rate(model, tokenizer, prompts, args, repeats=2, **engine_kwargs):
    """Build an engine, generate ``repeats`` times (the first includes graph capture); time the last."""
    import torch

    from spark_trl.rollout import FastRolloutEngine

    _sync()
    t0 = time.perf_counter()
    engine = FastRolloutEngine(model, tokenizer, args, fallback=False, **engine_kwargs)
    _sync()
    init_s = time.perf_counter() - t0
    first = None
    for i in range(repeats):
        steps0, full0 = engine.stats["steps"], engine.stats["full_path_steps"]
        _sync()
        t0 = time.perf_counter()
        comps = engine.generate(prompts)
        _sync()
        dt = time.perf_counter() - t0
        first = first if first is not None else dt
    steps = engine.stats["steps"] - steps0
    n_tok = sum(len(c) for c in comps)
    res = {"batch": len(prompts), **{k: v for k, v in engine_kwargs.items()}, "init_s": round(init_s, 2),
           "first_call_s": round(first, 2), "seconds": round(dt, 3), "steps": steps,
           "ms_per_step": round(1000 * dt / max(steps, 1), 2), "completion_tokens": n_tok,
           "tokens_per_s": round(n_tok / dt, 1), "full_path_steps": engine.stats["full_path_steps"] - full0,
           "capture_s": round(engine.stats.get("capture_s", 0.0), 2),
           "eos_stopped": sum(1 for c in comps if c and c[-1] in engine.params.eos_token_ids),
           "compiled": engine.decoder is not None and engine.decoder.compiled is not None,
           "compile_error": engine.compile_error}
    if torch.cuda.is_available():
        res.update(memory_snapshot())
    return engine, comps, res


def parse_variant(text):
    """``lora_mode:top_p_method[:compiled|:eager]`` -> FastRolloutEngine keyword arguments."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("compiled", "eager")):
        raise SystemExit(f"bad variant {text!r}: expected lora_mode:top_p_method[:compiled|:eager]")
    v = dict(lora_mode=parts[0], top_p_method=parts[1])
    if len(parts) == 3:
        v["compile_decode"] = parts[2] == "compiled"
    return v


def calibrate(opts):
    import torch

    from spark_trl.rollout import completion_logprobs, logprob_mismatch

    report = {"mode": "calibrate", "versions": versions(), "shape": opts.shape}
    path = build_random_model(opts.model_dir, opts.tokenizer, opts.shape)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    t0 = time.perf_counter()
    model = load_qlora(path, lora_init_std=opts.lora_init_std)
    report["load_4bit_s"] = round(time.perf_counter() - t0, 1)
    report["model_memory"] = memory_snapshot(reset=True)
    max_new = opts.max_new_tokens
    prompts = mbpp_chat_prompt_ids(tok, opts.mbpp, opts.batch)
    report["prompt_tokens_mean"] = sum(map(len, prompts)) / len(prompts)
    train_args = SimpleNamespace(temperature=1.0, top_p=0.98, top_k=0, min_p=None, repetition_penalty=1.0,
                                 max_completion_length=max_new, generation_kwargs=None)
    eval_args = SimpleNamespace(temperature=0.2, top_p=0.95, top_k=50, min_p=None, repetition_penalty=1.0,
                                max_completion_length=max_new, generation_kwargs=None)
    # Baseline: a few dozen steps of plain generate (the per-step cost barely grows with length at batch 32).
    base = plain_generate_rate(model, tok, prompts, opts.plain_steps, 1.0, 0.98)
    report["plain_train_sampling"] = base
    print("plain generate:", base, flush=True)
    rows = []
    variants = [parse_variant(v) for v in opts.variants.split(",")]
    best = None
    for v in variants:
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        try:
            engine, comps, res = engine_rate(model, tok, prompts, train_args, **v)
        except Exception as exc:  # report and go on: one failing variant must not lose the others
            res = {**v, "error": f"{type(exc).__name__}: {exc}"}
            engine = comps = None
        res["sampling"] = "train T1.0 top_p0.98"
        res["speedup_vs_plain"] = round(res.get("tokens_per_s", 0) / base["tokens_per_s"], 1)
        print(res, flush=True)
        rows.append(res)
        if engine is not None:
            lp = completion_logprobs(model, prompts, comps, temperature=1.0, batch_size=8)
            res["mismatch"] = logprob_mismatch(engine.last_logprobs, lp)
            print("  mismatch", res["mismatch"], flush=True)
            if best is None or res["tokens_per_s"] > best[1]["tokens_per_s"]:
                best = (v, res)
        del engine, comps
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    # The evaluation's sampling and a larger batch with the engine's defaults (or the fastest variant).
    bv = parse_variant(opts.follow) if opts.follow != "fastest" else (dict(best[0]) if best else variants[0])
    for args, label, batch in ((eval_args, "eval T0.2 top_p0.95 top_k50", opts.batch),
                               (train_args, "train T1.0 top_p0.98", 2 * opts.batch)):
        pr = prompts if batch == opts.batch else mbpp_chat_prompt_ids(tok, opts.mbpp, batch)
        try:
            engine, comps, res = engine_rate(model, tok, pr, args, max_batch_size=max(64, batch), **bv)
            del engine, comps
        except Exception as exc:
            res = {**bv, "batch": batch, "error": f"{type(exc).__name__}: {exc}"}
        res["sampling"] = label
        print(res, flush=True)
        rows.append(res)
        gc.collect()
    report["engine"] = rows
    report["eos_check"] = eos_check(model, tok, prompts, train_args, **bv)
    if opts.profile_steps:
        report["profile"] = profile_decode(model, tok, prompts, train_args, opts.profile_steps, **bv)
    # Baseline of the eval sampling, for the eval row's ratio; the training sampling's baseline once more, so that
    # drift of the GPU's speed during the run shows.
    report["plain_eval_sampling"] = plain_generate_rate(model, tok, prompts, opts.plain_steps, 0.2, 0.95, 50)
    print(json.dumps(report["plain_eval_sampling"]), flush=True)
    report["plain_train_sampling_again"] = plain_generate_rate(model, tok, prompts, opts.plain_steps, 1.0, 0.98)
    print("plain generate again:", report["plain_train_sampling_again"], flush=True)
    print(write_json(report, opts.out))
    print("\n| variant | sampling | batch | tok/s | ms/step | x plain | full-path steps | mismatch | peak alloc GiB |")
    for r in rows:
        plain = report["plain_eval_sampling" if r.get("sampling", "").startswith("eval") else "plain_train_sampling"]
        print(f"| {r.get('lora_mode')}/{r.get('top_p_method')}/{compiled_label(r)} | {r.get('sampling')} | "
              f"{r.get('batch')} | {r.get('tokens_per_s')} | {r.get('ms_per_step')} | "
              f"{round(r.get('tokens_per_s', 0) / plain['tokens_per_s'], 1)} | {r.get('full_path_steps')} | "
              f"{(r.get('mismatch') or {}).get('mean_abs')} | {r.get('peak_allocated_gib')} | {r.get('error', '')}")
    return report


def eos_check(model, tokenizer, prompts, args, **engine_kwargs):
    """TRL's EOS semantics under CUDA graphs (random weights never stop by themselves): with every other token id a
    stop token, completions must end at their first stop token or at the cap, and generation must stop early."""
    from spark_trl.rollout import FastRolloutEngine, completion_logprobs, logprob_mismatch

    vocab = model.config.vocab_size
    stops = list(range(0, vocab, 2))
    cap = 64
    check = SimpleNamespace(**{**vars(args), "max_completion_length": cap, "generation_kwargs": {"eos_token_id": stops}})
    engine = FastRolloutEngine(model, tokenizer, check, fallback=False, **engine_kwargs)
    comps = engine.generate(prompts)
    stop = set(stops)
    ok_cut = all(t not in stop for c in comps for t in c[:-1])
    ok_end = all(c and (c[-1] in stop or len(c) == cap) for c in comps)
    lp = completion_logprobs(model, prompts, comps, temperature=args.temperature, batch_size=8)
    res = {"steps": engine.stats["steps"], "cap": cap, "max_len": max(map(len, comps)),
           "mean_len": sum(map(len, comps)) / len(comps), "stop_only_at_end": ok_cut, "ends_at_stop_or_cap": ok_end,
           "stopped_early": engine.stats["steps"] < cap, "mismatch": logprob_mismatch(engine.last_logprobs, lp)}
    print("eos_check", res, flush=True)
    if not (ok_cut and ok_end and res["stopped_early"]):
        raise SystemExit(f"EOS semantics violated under CUDA graphs: {res}")
    return res


def profile_decode(model, tokenizer, prompts, args, steps, **engine_kwargs):
    """Where a decoding step's GPU time goes: torch.profiler over ``steps`` graph-replayed steps, kernels grouped."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from spark_trl.rollout import FastRolloutEngine

    short = SimpleNamespace(**{**vars(args), "max_completion_length": steps})
    engine = FastRolloutEngine(model, tokenizer, short, fallback=False, **engine_kwargs)
    engine.generate(prompts)  # compile + capture outside the profile
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.generate(prompts)
        _sync()
        wall = time.perf_counter() - t0
    # First match wins: attention before gemm (cuDNN's SDPA kernel names contain "sm90_" too).
    groups = {"attention": ("fmha", "attention", "flash", "efficient", "sdpa"), "sort/topk": ("sort", "radix", "topk",
              "scan"), "triton (compiled)": ("triton",), "gemm": ("gemm", "cutlass", "nvjet", "sm90_", "splitk")}
    totals, kernels, rows = {}, 0, []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if not t or ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.key.lower()
        group = next((g for g, keys in groups.items() if any(k in name for k in keys)), "other")
        totals[group] = totals.get(group, 0.0) + t / 1000.0
        kernels += ev.count
        rows.append((t / 1000.0, ev.count, ev.key[:90]))
    rows.sort(reverse=True)
    n = max(engine.stats["steps"], 1) // 2  # the profiled call's steps (the first call ran as many)
    res = {"steps": n, "wall_ms_per_step": round(1000 * wall / n, 3), "kernels_per_step": round(kernels / n, 1),
           "gpu_ms_per_step_by_group": {k: round(v / n, 3) for k, v in sorted(totals.items(), key=lambda x: -x[1])},
           "gpu_ms_per_step": round(sum(totals.values()) / n, 3),
           "top_kernels": [{"ms_per_step": round(t / n, 4), "calls_per_step": round(c / n, 1), "name": k}
                           for t, c, k in rows[:25]]}
    print("profile", json.dumps(res, indent=1), flush=True)
    return res


def compiled_label(row):
    return "compiled" if row.get("compiled") else "eager"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["calibrate", "train", "eval"])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--plain_steps", type=int, default=48)
    p.add_argument("--lora_init_std", type=float, default=1e-3)
    p.add_argument("--variants", default="separate:prefilter:eager,separate:prefilter:compiled,separate:sort:compiled,"
                   "merge:prefilter:compiled",
                   help="engine variants lora_mode:top_p_method[:compiled|:eager] (compile_decode; default: the "
                   "engine's own choice), comma-separated")
    p.add_argument("--follow", default="separate:prefilter",
                   help="variant for the eval-sampling, batch x2 and profile rows ('fastest': the fastest above)")
    p.add_argument("--profile_steps", type=int, default=0, help="profile this many decoding steps (0: no profile)")
    p.add_argument("--out", default=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("train", "eval"):  # trainer steps and evaluation live in gpu_train_bench
        from gpu_train_bench import main as train_main

        train_main(argv)
        return 0
    calibrate(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
