"""The sampler's importance-sampling correction (TRL's `vllm_importance_sampling_*`, for the fast engine's rollouts):
the weight against hand-computed values, the real trainer with the real FastRolloutEngine on CPU whose sampler
log-probs are shifted by known amounts (metrics, weights lined up over top-up rounds and prefetch, the gradient of
the weighted loss), the loss without it unchanged, and config validation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from spark_trl import SparkGRPOConfig, SparkGRPOTrainer, trl_private
from spark_trl.grpo_math import (sampler_importance_weights, sampler_mismatch_sums, sampler_weight_figures,
                                 spark_policy_loss)
from spark_trl.testing import PromptKeyedReward
from test_trainer import CapturingTrainer, _args, _dataset

LN = math.log

# ------------------------------------------------------------------------------------------------ the weight


def _w(old, samp, mask, mode, lo, hi):
    return sampler_importance_weights(torch.tensor(old), torch.tensor(samp), torch.tensor(mask), mode, lo, hi)


def test_token_truncate_clamps_each_token_ratio():
    # ratios old/sampler: 0.5/0.25 = 2, 0.1/0.4 = 0.25, 0.3/0.3 = 1
    old, samp = [[LN(0.5), LN(0.1), LN(0.3)]], [[LN(0.25), LN(0.4), LN(0.3)]]
    w = _w(old, samp, [[1, 1, 1]], "token_truncate", None, 1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.25, 1.0]]))
    w = _w(old, samp, [[1, 1, 1]], "token_truncate", 0.5, 3.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.0]]))


def test_token_mask_zeroes_tokens_outside_the_bounds():
    old, samp = [[LN(0.5), LN(0.1), LN(0.3)]], [[LN(0.25), LN(0.4), LN(0.3)]]
    w = _w(old, samp, [[1, 1, 1]], "token_mask", 0.5, 1.5)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 1.0]]))
    w = _w(old, samp, [[1, 1, 1]], "token_mask", None, None)  # no bound: the plain ratio
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.25, 1.0]]))


def test_sequence_modes_take_the_product_of_the_masked_token_ratios():
    # row 0: 2 * 0.25 * (masked token: left out) = 0.5; row 1: 2 * 2 = 4
    old = [[LN(0.5), LN(0.1), LN(0.9)], [LN(0.5), LN(0.5), 0.0]]
    samp = [[LN(0.25), LN(0.4), LN(0.1)], [LN(0.25), LN(0.25), 0.0]]
    mask = [[1, 1, 0], [1, 1, 0]]
    torch.testing.assert_close(_w(old, samp, mask, "sequence_truncate", None, 3.0), torch.tensor([[0.5], [3.0]]))
    torch.testing.assert_close(_w(old, samp, mask, "sequence_truncate", 0.6, 5.0), torch.tensor([[0.6], [4.0]]))
    torch.testing.assert_close(_w(old, samp, mask, "sequence_mask", None, 3.0), torch.tensor([[0.5], [0.0]]))
    torch.testing.assert_close(_w(old, samp, mask, "sequence_mask", 0.6, None), torch.tensor([[0.0], [4.0]]))


def test_unknown_sampler_log_probs_and_masked_tokens_weigh_one():
    nan = float("nan")
    w = _w([[LN(0.5), -1.0, -2.0]], [[LN(0.25), nan, 5.0]], [[1, 1, 0]], "token_truncate", None, 3.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 1.0]]))
    w = _w([[LN(0.5), -1.0]], [[LN(0.25), nan]], [[1, 1]], "sequence_mask", None, 3.0)
    torch.testing.assert_close(w, torch.tensor([[2.0]]))
    with pytest.raises(ValueError, match="mode must be one of"):
        _w([[0.0]], [[0.0]], [[1]], "token", None, 3.0)


def test_mismatch_and_weight_figures_cover_real_rows_and_known_tokens_only():
    nan = float("nan")
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    samp = torch.tensor([[-1.5, -1.0, nan], [-9.0, -9.0, -9.0]])  # row 1 is a padding row
    mask = torch.tensor([[1, 1, 1], [1, 1, 1]])
    rows = torch.tensor([True, False])
    assert sampler_mismatch_sums(old, samp, mask, rows) == [1.5, 2.0, 1.0]
    w = torch.tensor([[0.5, 2.0, 1.0], [7.0, 7.0, 7.0]])
    assert sampler_weight_figures(w, mask, rows) == [3.5, 3.0, 0.5, 2.0]
    assert sampler_weight_figures(torch.tensor([[0.5], [7.0]]), mask, rows) == [0.5, 1.0, 0.5, 0.5]


def test_spark_loss_weighs_the_surrogate_not_the_kl():
    """L = 1/|o| sum_t [-w_t r_t A + beta k3_t]; at r = 1: (-(0.5 + 2) * A) / 2 + beta * mean k3."""
    logps = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    w = torch.tensor([[0.5, 2.0]])
    loss, ratio, kl = spark_policy_loss(logps, logps, ref, torch.tensor([2.0]), torch.ones(1, 2), beta=0.1,
                                        sampler_weights=w)
    k3 = (0.5 - LN(0.5) - 1) + 0.0  # exp(ref - logp) - (ref - logp) - 1 per token
    assert float(loss[0]) == pytest.approx(-(0.5 + 2.0) * 2.0 / 2 + 0.1 * k3 / 2)
    unweighted, _, _ = spark_policy_loss(logps, logps, ref, torch.tensor([2.0]), torch.ones(1, 2), beta=0.1)
    assert float(unweighted[0]) == pytest.approx(-2.0 + 0.1 * k3 / 2)


# ------------------------------------------------------------------------------------------------ config

def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4)
    return SparkGRPOConfig(**{**base, **kw})


ON = dict(vllm_importance_sampling_correction=True, rollout_engine="spark")


@pytest.mark.parametrize("kwargs, message", [
    ({"vllm_importance_sampling_mode": "token"}, "vllm_importance_sampling_mode must be one of"),
    ({"vllm_importance_sampling_clip_max": -1.0}, "vllm_importance_sampling_clip_max bounds an importance ratio"),
    ({"vllm_importance_sampling_clip_max": 0.0}, "would zero every importance weight"),
    ({"vllm_importance_sampling_clip_min": float("nan")}, "vllm_importance_sampling_clip_min bounds"),
    ({"vllm_importance_sampling_clip_min": 2.0, "vllm_importance_sampling_clip_max": 1.5}, "must be less than"),
    ({**ON, "vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": None},
     "clip_min.* or .*clip_max"),  # TRL checks it too
    ({**ON, "rollout_engine": "trl"}, "there is no sampler/trainer gap"),
    ({**ON, "rollout_engine": "auto"}, "'auto' resolves to 'trl'"),  # no CUDA GPU here
    ({**ON, "rollout_engine": "trl", "use_vllm": True}, "with use_vllm=True is not supported"),
    ({**ON, "loss_type": "vespo", "vllm_importance_sampling_mode": "sequence_mask"}, "vespo"),
])
def test_config_rejects_sampler_settings_that_cannot_work(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _cfg(tmp_path, **kwargs)


def test_config_accepts_trl_s_fields_for_the_fast_engine_and_is_off_by_default(tmp_path):
    args = _cfg(tmp_path)
    assert args.vllm_importance_sampling_correction is False
    # TRL's defaults for the rest, and its deprecated alias rewritten by TRL into clip_max.
    assert (args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_max) == ("sequence_mask", 3.0)
    with pytest.warns(FutureWarning, match="vllm_importance_sampling_cap"):
        args = _cfg(tmp_path, **ON, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_cap=2.0)
    assert args.vllm_importance_sampling_clip_max == 2.0


def test_the_study_recipes_run_without_the_correction():
    from spark_trl.recipes import RECIPES, parse_recipe

    for name, recipe in RECIPES.items():
        _, args, _ = parse_recipe(recipe, ["--output_dir", "unused"])
        assert args.vllm_importance_sampling_correction is False, name


def test_trainer_re_checks_a_config_changed_after_it_was_built(tmp_path):
    args = _cfg(tmp_path)
    args.vllm_importance_sampling_correction = True  # rollout_engine stays "trl"
    with pytest.raises(ValueError, match="no sampler/trainer gap"):
        SparkGRPOTrainer(model="/nonexistent/model", reward_funcs=PromptKeyedReward(), args=args,
                         train_dataset=_dataset(["a"]))


def test_trl_s_loss_reads_use_vllm_only_where_the_correction_weighs_it():
    import inspect

    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._compute_loss)
    assert trl_private.SAMPLER_CORRECTION_LINE in source and source.count("self.use_vllm") == 1


# ------------------------------------------------------------------------------------------------ the trainer

def _shifted_engine(monkeypatch, shift):
    """The real FastRolloutEngine whose reported sampler log-probs are moved by shift(token, position) (or set to
    None when shift is None: the engine's model.generate fallback reports none)."""
    import spark_trl.rollout as rollout

    class ShiftedEngine(rollout.FastRolloutEngine):
        calls = 0

        def generate(self, prompt_ids):
            out = super().generate(prompt_ids)
            assert self.last_logprobs is not None  # the fast path ran
            ShiftedEngine.calls += 1
            if shift is None:
                self.last_logprobs = None
            else:
                self.last_logprobs = [[lp + shift(tok, t) for t, (tok, lp) in enumerate(zip(c, lps))]
                                      for c, lps in zip(out, self.last_logprobs)]
            return out

    monkeypatch.setattr(rollout, "FastRolloutEngine", ShiftedEngine)
    return ShiftedEngine


class _GradientProbe(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _metric(trainer, name):
    return [h[name] for h in trainer.state.log_history if name in h]


def _alternating(tok, t):
    return 0.3 if t % 2 == 0 else -0.5  # sampler log-prob + shift: old - sampler = -shift


@pytest.mark.parametrize("loss_type", ["spark", "grpo", "dapo"])
@pytest.mark.parametrize("correction", [True, False])
def test_weighted_loss_gradient_and_gap_metrics_match_hand_values(tiny_model_path, tmp_path, monkeypatch,
                                                                  loss_type, correction):
    """Sampler log-probs shifted by +0.3 at even and -0.5 at odd completion positions (the CPU engine matches the
    trainer to ~1e-6 otherwise): the logged gap is mean |shift| over the loss's tokens, max 0.5; with
    token_truncate at C_max = 1.2 the weights are exp(-0.3) and min(exp(0.5), 1.2); the first optimizer step's
    gradient is that of sum_i 1/|o_i| sum_t -w_t r_t A_i / N (spark, grpo) or sum_it -w_t r_t A_i / tokens (dapo),
    at r = 1. Without the correction: w = 1 (today's loss exactly) and no weight in the batch; the gap is still
    measured where old log-probs are computed anyway (num_iterations=2)."""
    _shifted_engine(monkeypatch, _alternating)
    probe = _GradientProbe()
    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=1,
                 num_iterations=1 if correction else 2, loss_type=loss_type, rollout_engine="spark",
                 learning_rate=0.0, max_grad_norm=0.0, beta=0.0,
                 vllm_importance_sampling_correction=correction, vllm_importance_sampling_mode="token_truncate",
                 vllm_importance_sampling_clip_max=1.2)
    trainer = CapturingTrainer(model=tiny_model_path, reward_funcs=PromptKeyedReward(), args=args,
                               train_dataset=_dataset(["vary"]), callbacks=[probe])
    trainer.train()
    batch = trainer.captured[0]
    mask = (batch["completion_mask"] * batch["tool_mask"]).float()
    positions = torch.arange(mask.size(1)).expand_as(mask)
    even = (positions % 2 == 0).float()
    shift_abs = 0.3 * even + 0.5 * (1 - even)
    assert mask.sum() > 0
    assert _metric(trainer, "sampling/sampling_logp_difference/mean")[0] == pytest.approx(
        float((shift_abs * mask).sum() / mask.sum()), abs=1e-5)
    assert _metric(trainer, "sampling/sampling_logp_difference/max")[0] == pytest.approx(0.5, abs=1e-5)
    stats = trainer.spark_stats_history[-1]
    assert stats["sampler_logp_diff_mean"] == pytest.approx(float((shift_abs * mask).sum() / mask.sum()), abs=1e-5)

    if correction:
        w = math.exp(-0.3) * even + 1.2 * (1 - even)
        torch.testing.assert_close(batch["importance_sampling_ratio"] * mask, w * mask, rtol=0, atol=1e-5)
        assert _metric(trainer, "sampling/importance_sampling_ratio/mean")[0] == pytest.approx(
            float((w * mask).sum() / mask.sum()), abs=1e-5)
        assert _metric(trainer, "sampling/importance_sampling_ratio/min")[0] == pytest.approx(math.exp(-0.3),
                                                                                             abs=1e-5)
        assert _metric(trainer, "sampling/importance_sampling_ratio/max")[0] == pytest.approx(1.2)
    else:
        w = torch.ones_like(mask)
        assert "importance_sampling_ratio" not in batch
        assert not _metric(trainer, "sampling/importance_sampling_ratio/mean")

    # The hand-computed loss of the first step (its micro-batch is the whole rollout), with the model that
    # computed it (lr 0: unchanged).
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.train()
    model.zero_grad()
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    logps = trl_private.per_token_logps(trainer, model, input_ids, attention, batch["completion_ids"].size(1))
    per_token = -w * torch.exp(logps - logps.detach()) * batch["advantages"].unsqueeze(1)
    if loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum()
    else:
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / float(batch["num_sequences"])
    loss.backward()
    assert probe.grads
    for name, param in model.named_parameters():
        if name in probe.grads:
            torch.testing.assert_close(probe.grads[name], param.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("top_up_mode, schedule", [("rounds", "batch"), ("prefetch", "batch"), ("rounds", "epoch")])
def test_sampler_log_probs_line_up_over_top_up_rounds_prefetch_and_epoch_chunks(tiny_model_path, tmp_path,
                                                                             monkeypatch, top_up_mode, schedule):
    """A shift that depends on each sampled token and its position: the weight of every token in the loss is
    exp(-shift(token, position)) only if each completion kept its own sampler log-probs through the top-up rounds
    ('flat' grows 4 -> 6 -> 8, 'late' 4 -> 6), the prefetched spares and the epoch's generation chunks."""
    def shift(tok, t):
        return 0.05 * (tok % 7) - 0.01 * t

    engine = _shifted_engine(monkeypatch, shift)
    steps = dict(num_train_epochs=1, lr_scheduler_type="constant") if schedule == "epoch" else dict(max_steps=1)
    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, steps_per_generation=3,
                 loss_type="spark", rollout_engine="spark", skip_zero_advantage="none", top_up_mode=top_up_mode,
                 rollout_schedule=schedule, learning_rate=0.0, vllm_importance_sampling_correction=True,
                 vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_max=None, **steps)
    trainer = CapturingTrainer(model=tiny_model_path, reward_funcs=PromptKeyedReward(), args=args,
                               train_dataset=_dataset(["vary", "late", "flat"]))
    trainer.train()
    batch = trainer.captured[0]
    assert engine.calls == (1 if top_up_mode == "prefetch" else 3)
    real = batch["seq_weight"] > 0
    assert int(real.sum()) == 18  # 4 + 6 + 8, every completion in the loss
    mask = (batch["completion_mask"] * batch["tool_mask"]).bool()
    ids = batch["completion_ids"]
    positions = torch.arange(ids.size(1)).expand_as(ids).float()
    expected = torch.exp(-(0.05 * (ids % 7).float() - 0.01 * positions))
    torch.testing.assert_close(batch["importance_sampling_ratio"][mask], expected[mask], rtol=0, atol=1e-5)


def test_a_round_without_sampler_log_probs_weighs_one(tiny_model_path, tmp_path, monkeypatch):
    """The engine's model.generate fallback reports no log-probs (it samples from the training model itself):
    weight 1, no gap logged."""
    _shifted_engine(monkeypatch, None)
    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=1,
                 loss_type="spark", rollout_engine="spark", vllm_importance_sampling_correction=True)
    trainer = CapturingTrainer(model=tiny_model_path, reward_funcs=PromptKeyedReward(), args=args,
                               train_dataset=_dataset(["vary"]))
    trainer.train()
    batch = trainer.captured[0]
    assert "old_per_token_logps" in batch  # computed for the correction
    assert "importance_sampling_ratio" not in batch
    assert not _metric(trainer, "sampling/sampling_logp_difference/mean")
