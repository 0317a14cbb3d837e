"""Tiny offline models for tests, benchmarks and the notebook's smoke mode.

``build_tiny_model(path)`` writes, without touching any hub, a randomly initialised Qwen2-architecture causal LM
and a byte-level BPE tokenizer with a ChatML chat template (Qwen2.5's format), both with ``save_pretrained``,
so that everything that loads "a model path" (TRL, PEFT, bitsandbytes, the study runner) can be exercised on
CPU in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "def is_even(n):\n    return n % 2 == 0\n",
    "def reverse(s):\n    return s[::-1]\n",
    "def maximum(xs):\n    return max(xs)\n",
    "def count(lst):\n    return sum(1 for x in lst if x)\n",
    "assert add(1, 2) == 3\nassert is_even(4) is True\nimport math\nfor i in range(10): print(i)\n",
    "You are an expert Python programmer. Return only correct Python code.",
    "Write the complete Python function satisfying this signature and docstring. "
    "Return only Python code, no markdown, no explanation.",
    "```python\nclass Solution:\n    pass\n```\n",
    "system user assistant 0123456789 ()[]{}:;,.=+-*/%<>!'\"#_",
]


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a few lines of Python, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(path: str | os.PathLike, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                     vocab_size: int = 320) -> Path:
    """Write a tiny Qwen2 causal LM and its tokenizer to ``path`` (created if needed); returns the path.

    Sizes are multiples of 64 so that bitsandbytes can quantize the linear layers to 4 bits.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class PromptKeyedReward:
    """A deterministic reward keyed on a ``task_id`` column, for tests of adaptive groups: tasks named 'flat*'
    never vary (0), 'vary*' vary within any call (``i % 2``, i = position in the call), 'late*' are flat the
    first time this reward sees them and vary afterwards. Records the task ids of every call in ``calls``."""

    __name__ = "prompt_keyed"

    def __init__(self):
        self.calls: list[list[str]] = []
        self.seen: set[str] = set()

    def __call__(self, prompts, completions, task_id, **kwargs):
        self.calls.append(list(task_id))
        rewards = []
        for i, t in enumerate(task_id):
            flat = t.startswith("flat") or (t.startswith("late") and t not in self.seen)
            rewards.append(0.0 if flat else float(i % 2))
        self.seen.update(task_id)
        return rewards
