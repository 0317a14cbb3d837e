"""The accelerate configs in recipes/accelerate/ (single GPU, DDP, FSDP + QLoRA, DeepSpeed ZeRO-2) are what the
launcher and the trainer need: each is resolved by accelerate's own launch parser, as `accelerate launch
--config_file recipes/accelerate/<name>.yaml` does, without starting processes. docs/distributed.md runs them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from spark_trl.runner import parse_recipe

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate"
RECIPE = REPO / "recipes" / "condition_a.py"


def _recipe(path: Path) -> dict:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the `if __name__ == "__main__"` guard keeps it from running
    return module.RECIPE


def _launch_env(name: str, num_processes: int) -> tuple[object, dict]:
    """What `accelerate launch --config_file recipes/accelerate/<name>.yaml` resolves: its arguments and, for the
    torchrun-based launchers, the environment it gives every process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", str(CONFIGS / f"{name}.yaml"), "--num_processes", str(num_processes), str(RECIPE)]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    env = prepare_multi_gpu_env(args) if (args.multi_gpu or args.use_fsdp) else {}
    return args, env


def test_accelerate_configs_are_the_documented_set():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == [
        "deepspeed_zero2.yaml", "fsdp.yaml", "multi_gpu_ddp.yaml", "single_gpu.yaml"]


def test_single_gpu_and_ddp_configs():
    args, _ = _launch_env("single_gpu", 1)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed, args.num_processes) == (False, False, False, 1)
    args, env = _launch_env("multi_gpu_ddp", 4)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed, args.num_processes) == (True, False, False, 4)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fsdp_config_is_the_qlora_one():
    """FSDP1 with flat parameters (use_orig_params false: frozen 4-bit and trainable LoRA weights wrapped apart),
    rank-0 loading broadcast to the others, and a full state dict so that adapters save as plain PEFT files."""
    args, env = _launch_env("fsdp", 2)
    assert args.use_fsdp and args.num_processes == 2
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    assert env["FSDP_USE_ORIG_PARAMS"] == "false"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true" and env["FSDP_SYNC_MODULE_STATES"] == "true"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


def test_fsdp_launch_line_stores_4bit_weights_in_bfloat16(tiny_model_path):
    """The FSDP launch line of docs/distributed.md passes --bnb_4bit_quant_storage bfloat16; the recipes' model
    loader honours it, so every weight FSDP flattens (packed 4-bit and LoRA alike) is bfloat16."""
    import torch

    from spark_trl.models import load_model

    _, _, model_args = parse_recipe(_recipe(RECIPE), ["--bnb_4bit_quant_storage", "bfloat16"])
    assert model_args.bnb_4bit_quant_storage == "bfloat16"
    model = load_model(tiny_model_path, load_in_4bit=True, dtype="float32", device="cpu",
                       quant_storage=model_args.bnb_4bit_quant_storage)
    assert model.config.quantization_config.bnb_4bit_quant_storage == torch.bfloat16
    packed = model.model.layers[0].self_attn.q_proj.weight
    assert type(packed).__name__ == "Params4bit" and packed.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    default = load_model(tiny_model_path, load_in_4bit=True, dtype="float32", device="cpu")
    assert default.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # bitsandbytes' own default


def test_deepspeed_config():
    args, _ = _launch_env("deepspeed_zero2", 2)
    assert args.use_deepspeed and args.zero_stage == 2 and args.num_processes == 2
