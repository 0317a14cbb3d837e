"""Evaluation: the pass@k estimator, batched generation, the isolated RNG, scoring through the sandbox, the CLI."""

from __future__ import annotations

import itertools
import json
import random
import sys
import types
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from spark_trl.evaluation import (EvalConfig, build_jobs, chat_prompts, eval_main, evaluate_problems, generate,
                                  generate_vllm, isolated_rng, pass_at_k, score_completions, summarize)


def _brute_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (c correct) holding at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 1, 1), (5, 2, 1), (5, 1, 5), (5, 3, 2), (10, 3, 5), (7, 6, 3),
                                   (10, 0, 10), (6, 6, 1)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_isolated_rng_restores_every_generator_and_is_reproducible():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with isolated_rng(123):
        inside = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    # The draws after the block are those that would have come without it.
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    with isolated_rng(123):
        again = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert inside == again


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from spark_trl.models import load_model, load_tokenizer

    return load_model(tiny_model_path, dtype="float32", check_memory=False), load_tokenizer(tiny_model_path)


def test_left_padded_batches_generate_what_single_prompts_do(tiny, mbpp_problems):
    model, tokenizer = tiny
    prompts = chat_prompts(tokenizer, mbpp_problems[:3])
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # really padded
    greedy = EvalConfig(n_samples=1, temperature=0.0, max_new_tokens=6, batch_size=8, progress=False)
    batched = generate(model, tokenizer, prompts, greedy)
    single = [generate(model, tokenizer, [p], replace(greedy, batch_size=1))[0] for p in prompts]
    assert batched == single


def test_generation_halves_the_batch_on_out_of_memory(tiny, mbpp_problems):
    model, tokenizer = tiny
    prompts = chat_prompts(tokenizer, mbpp_problems[:3])
    seen = []

    def on_batch(size):  # an accelerator that only holds 2 sequences at once
        seen.append(size)
        if size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    config = EvalConfig(n_samples=2, max_new_tokens=3, batch_size=8, progress=False)
    with isolated_rng(0):
        out = generate(model, tokenizer, prompts, config, on_batch=on_batch)
    assert seen == [6, 4, 2, 2, 2]  # 6 sequences: a batch of 6 fails, of 4 fails, then batches of 2
    assert [len(o) for o in out] == [2, 2, 2]

    def always(size):
        raise torch.OutOfMemoryError("injected")

    with pytest.raises(torch.OutOfMemoryError):
        generate(model, tokenizer, prompts[:1], config, on_batch=always)


def test_generate_restores_training_mode(tiny, mbpp_problems):
    model, tokenizer = tiny
    model.train()
    generate(model, tokenizer, chat_prompts(tokenizer, mbpp_problems[:1]),
             EvalConfig(n_samples=1, max_new_tokens=2, progress=False))
    assert model.training
    model.eval()


def test_humaneval_program_keeps_the_prompt_prelude(humaneval_problems):
    """HumanEval/10's prompt defines the helper is_palindrome; a completion restating only make_palindrome (as
    instruct models do) must still pass, as it does when the prompt is part of the program."""
    from spark_trl.sandbox import Executor

    problem = humaneval_problems[10]
    assert "def is_palindrome" in problem.test_setup
    body = problem.reference.split('"""')[-1]
    completion = "```python\ndef make_palindrome(string: str) -> str:" + body + "\n```"
    broken = "```python\ndef make_palindrome(string: str) -> str:\n    return string\n```"
    with Executor(workers=2) as executor:
        records = score_completions([problem], [[completion, broken]], executor, name="humaneval")
        samples = records[0]["samples"]
        assert samples[0]["passed"] and samples[0]["status"] == "passed"
        assert not samples[1]["passed"] and samples[1]["status"] == "wrong_answer"
        assert samples[1]["error_type"] == "AssertionError"
        # The same program without the prelude fails: what the study's evaluation did to such completions.
        jobs, _ = build_jobs([problem], [[completion]])
        outcome = executor.run([replace(jobs[0], setup="")])[0]
        assert outcome.status.value == "runtime_error" and "is_palindrome" in outcome.error_tail


def test_scoring_and_summary_count_only_programs_passing_every_test(mbpp_problems):
    from spark_trl.sandbox import Executor

    problems = mbpp_problems[:2]
    first_test = problems[1].tests[0]
    wrong = f"def {problems[1].entry_point}(*a):\n    return None"
    completions = [[p.reference for _ in range(2)] + ["def nope(:"] for p in problems[:1]]
    completions.append([wrong, "import sys\nsys.exit(0)", problems[1].reference])
    with Executor(workers=2) as executor:
        records = score_completions(problems, completions, executor, name="mbpp")
    pass_at, per_problem, statuses = summarize(records, ks=(1, 2))
    assert [p["c"] for p in per_problem] == [2, 1]
    assert pass_at[1] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert pass_at[2] == pytest.approx((pass_at_k(3, 2, 2) + pass_at_k(3, 1, 2)) / 2)
    assert statuses.get("syntax_error") == 1
    assert records[1]["samples"][1]["passed"] is False  # sys.exit(0) is not a pass
    assert first_test  # problems have tests


def test_samples_stop_at_their_first_failure_with_the_same_pass_at_k_and_verdicts(mbpp_problems):
    """pass@k only asks whether every test passes: stopping a sample at its first failing test changes no
    verdict, and a looping sample costs one timeout instead of one per test."""
    import time

    from spark_trl.sandbox import Executor

    problems = mbpp_problems[:3]

    def samples(p):
        name = p.entry_point
        return [p.reference,
                f"def {name}(*args, **kwargs):\n    while True:\n        pass",  # loops on every test
                f"def {name}(*args, **kwargs):\n    return None",  # a stub: wrong (or raising) everywhere
                f"{p.reference}\n_calls = []\ndef {name}(*args, _f={name}, **kwargs):\n"  # right on the first
                f"    _calls.append(1)\n    return _f(*args, **kwargs) if len(_calls) == 1 else None",
                f"def {name}(:",
                "import sys\nsys.exit(0)"]

    completions = [samples(p) for p in problems]
    with Executor(workers=2, timeout=0.5) as executor:
        fast = score_completions(problems, completions, executor, name="mbpp", timeout=0.5)
        every = score_completions(problems, completions, executor, name="mbpp", timeout=0.5, stop_after="never")
        loop = [[completions[0][1]]]
        t0 = time.perf_counter()
        (looped,) = score_completions(problems[:1], loop, executor, timeout=0.5)
        fast_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        score_completions(problems[:1], loop, executor, timeout=0.5, stop_after="never")
        every_s = time.perf_counter() - t0
    assert summarize(fast, ks=(1, 2, 5)) == summarize(every, ks=(1, 2, 5))
    assert [p["c"] for p in summarize(fast, ks=(1,))[1]] == [1, 1, 1]
    keys = ("status", "error_type", "error_tail", "passed", "no_attempt", "tests_total", "code")
    for a, b in zip((s for r in fast for s in r["samples"]), (s for r in every for s in r["samples"])):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["code"]
        assert b["tests_not_run"] == 0 and a["tests_passed"] <= b["tests_passed"]
        # What did not run is said: passed, then the first failure, then not run. A program that does not
        # compile (4) or does not load (5: it exits) fails every test alike, as before.
        expected = 0 if a["sample"] in (0, 4, 5) else a["tests_total"] - a["tests_passed"] - 1
        assert a["tests_not_run"] == expected, a["code"]
    first_right = fast[0]["samples"][3]
    assert (first_right["tests_passed"], first_right["tests_not_run"]) == (1, len(problems[0].tests) - 2)
    assert looped["samples"][0]["status"] == "timeout" and looped["samples"][0]["tests_not_run"] == 2
    n = len(problems[0].tests)
    assert n == 3 and every_s >= n * 0.5 and fast_s < n * 0.5


def test_evaluate_writes_every_sample_and_leaves_the_rng_alone(tiny, mbpp_problems, tmp_path):
    model, tokenizer = tiny
    config = EvalConfig(n_samples=2, max_new_tokens=4, batch_size=4, seed=5, progress=False, workers=2)
    torch.manual_seed(0)
    before = torch.get_rng_state().clone()
    path = tmp_path / "samples.jsonl"
    result = evaluate_problems(model, tokenizer, mbpp_problems[:3], config, name="mbpp", samples_path=path)
    assert torch.equal(torch.get_rng_state(), before)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6
    assert {"task_id", "completion", "code", "status", "error_type", "tests_passed", "tests_total",
            "tests_not_run"} <= set(rows[0])
    assert [r["task_id"] for r in rows[::2]] == [p.task_id for p in mbpp_problems[:3]]
    assert result.n_problems == 3 and set(result.pass_at) == {1}  # pass@5 needs 5 samples
    again = evaluate_problems(model, tokenizer, mbpp_problems[:3], config, name="mbpp")
    assert [s for r in again.per_problem for s in r.values()] == [s for r in result.per_problem for s in r.values()]
    assert [r["completion"] for r in rows] == [json.loads(line)["completion"]
                                               for line in path.read_text().splitlines()]


def test_vllm_option_reaches_sampling_params(monkeypatch):
    """vLLM cannot be installed here: check the wiring with a stand-in module recording its arguments."""
    calls = {}
    fake = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            calls["params"] = kw

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw

        def generate(self, prompts, params, lora_request=None):
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"{p}-{i}") for i in range(3)])
                    for p in prompts]

    fake.SamplingParams, fake.LLM = SamplingParams, LLM
    monkeypatch.setitem(sys.modules, "vllm", fake)
    config = EvalConfig(n_samples=3, temperature=0.2, top_p=0.95, max_new_tokens=512, seed=7, use_vllm=True)
    out = generate_vllm("some/model", ["a", "b"], config)
    assert calls["params"] == {"n": 3, "temperature": 0.2, "top_p": 0.95, "max_tokens": 512, "seed": 7}
    assert calls["llm"]["model"] == "some/model"
    assert out == [["a-0", "a-1", "a-2"], ["b-0", "b-1", "b-2"]]


def test_eval_cli_refuses_bad_input_before_loading(tiny_model_path, tmp_path, capsys):
    assert eval_main(["--model_name_or_path", tiny_model_path, "--adapter", str(tmp_path / "nope"),
                      "--output_dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert eval_main(["--model_name_or_path", tiny_model_path, "--adapter", tiny_model_path,
                      "--output_dir", str(tmp_path / "o")]) == 2
    assert "not a PEFT adapter" in capsys.readouterr().err
    assert eval_main(["--model_name_or_path", tiny_model_path, "--use_vllm", "--output_dir", str(tmp_path / "o")]) == 2
    assert "vLLM" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_cli_on_base_adapter_and_merged(tiny_model_path, mbpp_path, tmp_path, capsys):
    from peft import get_peft_model

    from spark_trl.models import load_model, lora_config

    # An adapter whose weights are not zero, so that base and base + adapter really differ.
    peft_model = get_peft_model(load_model(tiny_model_path, dtype="float32", check_memory=False),
                                lora_config(target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    merged = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged)
    load_tokenizer_from = tiny_model_path
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(load_tokenizer_from).save_pretrained(merged)
    common = ["--benchmarks", "mbpp-heldout", "--mbpp", str(mbpp_path), "--limit", "2", "--n_samples", "2",
              "--max_new_tokens", "4", "--temperature", "0", "--no_progress", "--workers", "2"]
    completions = {}
    for label, model_args in {"base": ["--model_name_or_path", tiny_model_path],
                              "adapter": ["--model_name_or_path", tiny_model_path, "--adapter", str(adapter)],
                              "adapter_only": ["--model", str(adapter)],
                              "merged": ["--model", str(merged)]}.items():
        out = tmp_path / label
        assert eval_main(model_args + common + ["--output_dir", str(out)]) == 0, label
        summary = json.loads((out / "summary.json").read_text())
        assert summary["results"]["mbpp-heldout"]["problems"] == 2
        completions[label] = [json.loads(x)["completion"]
                              for x in (out / "mbpp-heldout.samples.jsonl").read_text().splitlines()]
    assert "pass@1" in capsys.readouterr().out
    assert completions["adapter"] == completions["adapter_only"] == completions["merged"]
    assert completions["adapter"] != completions["base"]


# ------------------------------------------------------------------------------------------- model loading


def _config_only_model(path, **shape):
    """A model directory holding only config.json (no weights): what a size check must be able to judge."""
    from transformers import Qwen2Config

    Qwen2Config(**shape).save_pretrained(path)
    return str(path)


def test_a_model_too_large_for_the_device_is_refused_before_loading(tmp_path):
    from spark_trl.models import ModelLoadError, check_fits, estimate_model_bytes, load_model

    qwen_3b = _config_only_model(tmp_path / "3b", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                 num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                                 tie_word_embeddings=True)
    bf16 = estimate_model_bytes(qwen_3b, dtype="bfloat16")
    nf4 = estimate_model_bytes(qwen_3b, load_in_4bit=True, dtype="bfloat16")
    assert 3.0e9 * 2 < bf16 < 3.2e9 * 2  # Qwen2.5-3B: 3.09 B parameters
    assert 1.5e9 < nf4 < 2.6e9  # embeddings stay bf16, the projections go to ~4.5 bits
    with pytest.raises(ModelLoadError, match="needs about .* GiB .* 6.0 GiB free.*--load_in_4bit"):
        check_fits(qwen_3b, dtype="bfloat16", available=6 * 2**30)
    assert check_fits(qwen_3b, load_in_4bit=True, dtype="bfloat16", available=6 * 2**30) == nf4
    huge = _config_only_model(tmp_path / "72b", vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                              num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8)
    with pytest.raises(ModelLoadError, match="needs about"):
        load_model(huge, dtype="bfloat16")  # no weights in the folder: the check comes first


def test_estimate_matches_a_real_model(tiny_model_path, tiny):
    from spark_trl.models import estimate_model_bytes

    model, _ = tiny
    real = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    assert estimate_model_bytes(tiny_model_path, dtype="float32") == real


def test_four_bit_loading_is_nf4_with_double_quant(tiny_model_path):
    import bitsandbytes as bnb

    from spark_trl.models import load_model

    model = load_model(tiny_model_path, load_in_4bit=True, dtype="float32", check_memory=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q,k,v,o,gate,up,down in each of the 2 layers
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested


def test_adapter_path_errors_name_the_problem(tmp_path, tiny_model_path):
    from spark_trl.models import ModelLoadError, check_adapter, load_model, resolve_model

    with pytest.raises(ModelLoadError, match="does not exist"):
        check_adapter(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        check_adapter(tmp_path / "file")
    with pytest.raises(ModelLoadError, match="holds a full model"):
        load_model(tiny_model_path, adapter=tiny_model_path)
    with pytest.raises(ModelLoadError, match="no model given"):
        resolve_model(None)


def test_evaluating_a_cpu_4bit_model_leaves_it_trainable(tiny_model_path, mbpp_problems):
    """bitsandbytes repacks CPU 4-bit weights on an eval-mode forward, after which training forwards fail; a study
    evaluates between training steps, so generation must not trigger that repacking."""
    from peft import get_peft_model

    from spark_trl.models import load_model, load_tokenizer, lora_config

    model = get_peft_model(load_model(tiny_model_path, load_in_4bit=True, dtype="float32", check_memory=False),
                           lora_config())
    tokenizer = load_tokenizer(tiny_model_path)
    model.train()
    generate(model, tokenizer, chat_prompts(tokenizer, mbpp_problems[:1]),
             EvalConfig(n_samples=1, max_new_tokens=2, progress=False))
    model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_fast_engine_evaluation_samples_what_generate_samples(tiny, mbpp_problems):
    """rollout_engine='spark' goes through FastRolloutEngine; at a near-zero temperature both paths must
    produce the greedy continuation, n_samples per prompt, in prompt order."""
    from spark_trl.evaluation import generate_fast

    model, tokenizer = tiny
    prompts = chat_prompts(tokenizer, mbpp_problems[:3], None)
    config = EvalConfig(n_samples=2, temperature=1e-5, top_p=1.0, max_new_tokens=6, batch_size=8, progress=False)
    with isolated_rng(0), warnings.catch_warnings():
        warnings.filterwarnings("error", message="FastRolloutEngine falls back")  # the engine itself must run
        fast = generate_fast(model, tokenizer, prompts, config)
    greedy = generate(model, tokenizer, prompts, replace(config, temperature=0.0))
    assert [len(c) for c in fast] == [2, 2, 2]
    assert fast == greedy
    with pytest.raises(ValueError, match="rollout_engine must be"):
        EvalConfig(rollout_engine="turbo")


def test_fast_evaluation_can_borrow_an_engine_and_gives_it_back(tiny, mbpp_problems):
    """generate_fast(engine=...) samples with the evaluation's settings from the given engine (no new engine) and
    leaves that engine's own settings as they were."""
    from types import SimpleNamespace

    from spark_trl.evaluation import generate_fast
    from spark_trl.rollout import FastRolloutEngine

    model, tokenizer = tiny
    train_args = SimpleNamespace(temperature=1.0, top_p=0.98, max_completion_length=3, generation_kwargs=None)
    engine = FastRolloutEngine(model, tokenizer, train_args, fallback=False)
    prompts = chat_prompts(tokenizer, mbpp_problems[:3], None)
    config = EvalConfig(n_samples=2, temperature=1e-5, top_p=1.0, max_new_tokens=6, batch_size=8, progress=False)
    with isolated_rng(0):
        fast = generate_fast(model, tokenizer, prompts, config, engine=engine)
    assert fast == generate(model, tokenizer, prompts, replace(config, temperature=0.0))  # the eval's settings
    assert engine.stats["tokens"] > 0  # it was this engine that sampled
    assert (engine.params.temperature, engine.params.top_p, engine.params.max_new_tokens) == (1.0, 0.98, 3)
    assert all(len(c) <= 3 for c in engine.generate([[1, 2, 3]] * 2))
