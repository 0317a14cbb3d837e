"""Every model option a recipe parses reaches the model: the loader's arguments, or the LoRA config."""

from __future__ import annotations

import dataclasses

import pytest
from trl import ModelConfig, get_peft_config

from spark_trl.models import MODEL_CONFIG_FIELDS, ModelLoadError, load_model_from_args
from spark_trl.runner import RECIPES, parse_recipe


def test_every_model_config_field_has_a_destination():
    """A field that TRL adds to ModelConfig would otherwise be parsed by the recipes and silently ignored."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    placed = set(MODEL_CONFIG_FIELDS["loader"]) | set(MODEL_CONFIG_FIELDS["peft"])
    assert fields - placed == set(), "ModelConfig fields that reach neither the loader nor the LoRA config"
    assert placed - fields == set(), "fields placed in MODEL_CONFIG_FIELDS that ModelConfig no longer has"


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """The keyword arguments of every AutoModelForCausalLM.from_pretrained call (which still loads the model)."""
    from transformers import AutoModelForCausalLM

    calls = []
    original = AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    return calls


def test_loader_flags_reach_the_loaded_model(tiny_model_path, from_pretrained_calls):
    """The recipe sets NF4 with double quantization; flags that say otherwise win, down to the quantized layers."""
    _, _, model_args = parse_recipe(RECIPES["condition_a"], [
        "--model_name_or_path", tiny_model_path, "--dtype", "float32", "--bnb_4bit_quant_type", "fp4",
        "--use_bnb_nested_quant", "false", "--bnb_4bit_quant_storage", "float32", "--model_revision", "v1.0",
        "--attn_implementation", "eager"])
    model = load_model_from_args(model_args, check_memory=False)
    (kwargs,) = from_pretrained_calls
    quant = kwargs["quantization_config"]
    assert (quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant) == ("fp4", False)
    assert str(quant.bnb_4bit_quant_storage) == "torch.float32"
    assert (kwargs["revision"], kwargs["attn_implementation"], str(kwargs["dtype"])) == (
        "v1.0", "eager", "torch.float32")
    state = model.model.layers[0].self_attn.q_proj.weight.quant_state
    assert state.quant_type == "fp4" and not state.nested
    assert model.config._attn_implementation == "eager"


def test_recipe_defaults_load_nf4_with_double_quantization(tiny_model_path, from_pretrained_calls):
    _, _, model_args = parse_recipe(RECIPES["condition_a"], ["--model_name_or_path", tiny_model_path,
                                                            "--dtype", "float32"])
    model = load_model_from_args(model_args, check_memory=False)
    quant = from_pretrained_calls[0]["quantization_config"]
    assert (quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant) == ("nf4", True)
    state = model.model.layers[0].self_attn.q_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested


def test_eight_bit_and_bad_quant_type_are_settled_before_loading(tiny_model_path, from_pretrained_calls):
    args = ModelConfig(model_name_or_path=tiny_model_path, load_in_8bit=True)
    load_model_from_args(args, check_memory=False)
    assert from_pretrained_calls[0]["quantization_config"].load_in_8bit
    bad = ModelConfig(model_name_or_path="/nonexistent", load_in_4bit=True)
    bad.bnb_4bit_quant_type = "int3"
    with pytest.raises(ModelLoadError, match="bnb_4bit_quant_type must be 'nf4' or 'fp4'"):
        load_model_from_args(bad, check_memory=False)


def test_peft_flags_reach_the_lora_config():
    non_default = dict(lora_r=8, lora_alpha=7, lora_dropout=0.2, lora_target_modules=["q_proj", "v_proj"],
                       lora_target_parameters=["mlp.experts.down_proj"], lora_modules_to_save=["lm_head"],
                       lora_task_type="SEQ_CLS", use_rslora=True, use_dora=True)
    assert set(non_default) | {"use_peft"} == set(MODEL_CONFIG_FIELDS["peft"])
    config = get_peft_config(ModelConfig(use_peft=True, **non_default))  # what StudyRunner.build_trainer passes
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.use_dora) == (
        8, 7, 0.2, True, True)
    assert set(config.target_modules) == {"q_proj", "v_proj"} and set(config.target_parameters) == {"mlp.experts.down_proj"}
    assert config.modules_to_save == ["lm_head"] and config.task_type == "SEQ_CLS"
    assert get_peft_config(ModelConfig(use_peft=False)) is None
