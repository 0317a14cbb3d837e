"""Loading the policy: a hub id or a local path, optionally in 4 bits, with or without a LoRA adapter.

What the study used is QLoRA: the base model in 4-bit NF4 with double quantization and bf16 compute, and a LoRA
adapter (r=16, alpha=32, dropout=0.05) on every attention and MLP projection. ``load_model`` takes any of:

* a base model (hub id or local path),
* a base model plus an adapter directory (``adapter=``), or an adapter directory alone (its
  ``adapter_config.json`` names the base),
* a merged model (a plain checkpoint, loaded like a base model).

Bad input fails before any weight is read: an adapter path that is not an adapter, or a model that cannot fit
the memory of the device it is loaded on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
# Bytes per parameter of the weights that bitsandbytes quantizes (NF4 + double-quant constants) and of those
# it leaves in the compute dtype (embeddings, norms, the LM head).
_NF4_BYTES = 0.5 + 0.07
_INT8_BYTES = 1.0 + 0.02
# Room left for activations, the KV cache and the CUDA context when checking that a model fits.
_HEADROOM = 1.25


class ModelLoadError(ValueError):
    """A model or adapter that spark-trl cannot load; the message says what to pass instead."""


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a local directory holding a PEFT adapter (``adapter_config.json``)."""
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def check_adapter(path: str | os.PathLike) -> dict:
    """The adapter's config, or a ``ModelLoadError`` naming what is wrong with ``path``.

    Example:
    ```python
    >>> check_adapter("runs/not-there")
    Traceback (most recent call last):
    ...
    spark_trl.models.ModelLoadError: adapter path runs/not-there does not exist
    ```
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"adapter path {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"adapter path {path} is a file, not an adapter directory")
    if not (path / ADAPTER_CONFIG).is_file():
        hint = (" It holds a full model (config.json): pass it as the model, not as an adapter."
                if (path / "config.json").is_file() else "")
        raise ModelLoadError(f"{path} is not a PEFT adapter directory: no {ADAPTER_CONFIG} in it.{hint}")
    try:
        return json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / ADAPTER_CONFIG}: unreadable ({exc})") from None


def resolve_dtype(dtype: str | None):
    """``"bfloat16"``/``"float16"``/``"float32"``/``"auto"``/None -> a torch dtype (``auto``: bf16 on a GPU that
    supports it, else float32)."""
    import torch

    if dtype in (None, "auto"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use bfloat16, float16, float32 or auto") from None


def quantization_config(load_in_4bit: bool = True, compute_dtype="bfloat16", double_quant: bool = True,
                        quant_type: str = "nf4", quant_storage=None, load_in_8bit: bool = False):
    """The study's 4-bit config (NF4, double quantization, bf16 compute), an 8-bit config, or None when not
    quantizing.

    ``quant_storage`` (e.g. ``"bfloat16"``): the dtype the packed 4-bit weights are stored in; FSDP can only shard
    float storage (QLoRA under FSDP, see docs/distributed.md). None keeps bitsandbytes' uint8.
    """
    from transformers import BitsAndBytesConfig

    if load_in_4bit and load_in_8bit:
        raise ModelLoadError("load_in_4bit and load_in_8bit exclude each other: choose one")
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not load_in_4bit:
        return None
    if quant_type not in ("nf4", "fp4"):
        raise ModelLoadError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    extra = {"bnb_4bit_quant_storage": resolve_dtype(quant_storage)} if quant_storage else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=resolve_dtype(compute_dtype), **extra)


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules=LORA_TARGET_MODULES):
    """The study's LoRA adapter config.

    Example:
    ```python
    >>> cfg = lora_config()
    >>> cfg.r, cfg.lora_alpha, sorted(cfg.target_modules)[:2]
    (16, 32, ['down_proj', 'gate_proj'])
    ```
    """
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      bias="none", task_type="CAUSAL_LM")


def estimate_model_bytes(model_name_or_path: str, load_in_4bit: bool = False, dtype="auto",
                         load_in_8bit: bool = False, revision: str | None = None) -> int:
    """Bytes the weights will take once loaded, from the config alone (no weight is read)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name_or_path, **({"revision": revision} if revision else {}))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    dense = quantizable = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            quantizable += module.weight.numel()
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights counted once
        if id(p) in seen or (tied and name.startswith("lm_head")):
            continue
        seen.add(id(p))
        dense += p.numel()
    dense -= quantizable
    width = torch.tensor([], dtype=resolve_dtype(dtype)).element_size()
    if load_in_4bit:
        return int(quantizable * _NF4_BYTES + dense * width)
    if load_in_8bit:
        return int(quantizable * _INT8_BYTES + dense * width)
    return int((quantizable + dense) * width)


def available_memory(device: str | None = None) -> int:
    """Free bytes on ``device`` (a CUDA device, else the host's available RAM)."""
    import torch

    if (device is None or str(device).startswith("cuda")) and torch.cuda.is_available():
        index = torch.device(device or "cuda").index
        free, _ = torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_fits(model_name_or_path: str, load_in_4bit: bool = False, dtype="auto", device: str | None = None,
               available: int | None = None, load_in_8bit: bool = False, revision: str | None = None) -> int:
    """Raise ``ModelLoadError`` when the model's weights (plus headroom) exceed the device's free memory.

    Returns the estimated size in bytes. ``available`` overrides the measured free memory (for tests and for
    users who share a device).
    """
    need = estimate_model_bytes(model_name_or_path, load_in_4bit, dtype, load_in_8bit, revision)
    have = available_memory(device) if available is None else available
    if need * _HEADROOM > have:
        where = "the GPU" if (device or "").startswith("cuda") or (device is None and _cuda()) else "host RAM"
        hint = "" if load_in_4bit or load_in_8bit else "; loading it in 4 bits (--load_in_4bit) needs about a quarter of that"
        raise ModelLoadError(
            f"{model_name_or_path} needs about {need * _HEADROOM / 2**30:.1f} GiB ({need / 2**30:.1f} GiB of weights"
            f" plus room to run) but {where} has {have / 2**30:.1f} GiB free{hint}")
    return need


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_model(model_name_or_path: str | None, adapter: str | None = None) -> tuple[str, str | None]:
    """(base model, adapter dir) from what the user passed: an adapter dir given as the model is split into its
    base (from ``adapter_config.json``) and itself."""
    if adapter is not None:
        config = check_adapter(adapter)
        if model_name_or_path is None:
            model_name_or_path = config.get("base_model_name_or_path")
            if not model_name_or_path:
                raise ModelLoadError(f"{adapter}: the adapter does not name its base model; pass --model_name_or_path")
    elif model_name_or_path is not None and is_adapter_dir(model_name_or_path):
        return resolve_model(None, model_name_or_path)
    if not model_name_or_path:
        raise ModelLoadError("no model given: pass --model_name_or_path (a hub id or a local directory)")
    return str(model_name_or_path), (str(adapter) if adapter is not None else None)


def load_tokenizer(model_name_or_path: str, adapter: str | None = None, revision: str | None = None):
    """The tokenizer, left-padded for batched generation, with a pad token (the EOS when the model has none).
    An adapter directory that ships its own tokenizer wins over the base's."""
    from transformers import AutoTokenizer

    own = adapter and (Path(adapter) / "tokenizer_config.json").is_file()
    source = adapter if own else model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source, **({"revision": revision} if revision and not own else {}))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_name_or_path: str | None, adapter: str | None = None, load_in_4bit: bool = False,
               dtype="auto", device: str | None = None, check_memory: bool = True,
               attn_implementation: str | None = None, trainable_adapter: bool = False, quant_storage=None,
               double_quant: bool = True, quant_type: str = "nf4", load_in_8bit: bool = False,
               revision: str | None = None):
    """A causal LM ready for generation or training.

    ``adapter``: a PEFT adapter directory applied on top (``trainable_adapter`` keeps it trainable).
    ``check_memory``: refuse, before reading any weight, a model that cannot fit the device.
    ``load_in_4bit`` with ``quant_type``/``double_quant``/``quant_storage``, or ``load_in_8bit``: bitsandbytes.
    ``revision``: the hub revision (branch, tag or commit) of the base model.

    Example:
    ```python
    >>> model = load_model("Qwen/Qwen2.5-Coder-3B-Instruct", adapter="out/best", load_in_4bit=True)
    ```
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_name_or_path, adapter = resolve_model(model_name_or_path, adapter)
    # Checked before anything is read: a bad quantization setting is an error, not a silent default.
    quant = quantization_config(load_in_4bit, dtype if dtype not in (None, "auto") else "bfloat16",
                                double_quant=double_quant, quant_type=quant_type, quant_storage=quant_storage,
                                load_in_8bit=load_in_8bit)
    if device is None:
        from accelerate import PartialState

        # Under `accelerate launch` each process loads onto its own GPU.
        device = str(PartialState().device) if torch.cuda.is_available() else "cpu"
    if check_memory:
        check_fits(model_name_or_path, load_in_4bit, dtype, device, load_in_8bit=load_in_8bit, revision=revision)
    kwargs = {"dtype": resolve_dtype(dtype)}
    if revision:
        kwargs["revision"] = revision
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quant is not None and quant_storage and load_in_4bit:
        kwargs["dtype"] = resolve_dtype(quant_storage)  # FSDP flattens 4-bit and float weights together
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
    if quant is None:
        model.to(device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable_adapter)
    return model


# Where each field of TRL's `ModelConfig` (the recipes' model options) goes: "loader" fields are arguments of
# `load_model_from_args`, "peft" fields go through `trl.get_peft_config`. A field in neither would be parsed and
# silently ignored; tests/test_models.py fails when TRL adds one that is not placed here.
MODEL_CONFIG_FIELDS = {
    "loader": ("model_name_or_path", "model_revision", "dtype", "attn_implementation", "load_in_4bit",
               "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage"),
    "peft": ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
             "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora"),
}


def load_model_from_args(model_args, **kwargs):
    """The base model that a TRL `ModelConfig` describes (every "loader" field of `MODEL_CONFIG_FIELDS`);
    ``kwargs`` go to `load_model` (``device``, ``check_memory``)."""
    return load_model(
        model_args.model_name_or_path, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        load_in_4bit=model_args.load_in_4bit, load_in_8bit=model_args.load_in_8bit,
        quant_type=model_args.bnb_4bit_quant_type, double_quant=model_args.use_bnb_nested_quant,
        quant_storage=model_args.bnb_4bit_quant_storage, revision=model_args.model_revision, **kwargs)
