"""Advantage, clipping and KL arithmetic of SparkGRPOTrainer against hand-computed values; config validation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from spark_trl.configs import SparkGRPOConfig
from spark_trl.trainer import group_advantages, kl_sums, spark_policy_loss


def _adv(groups, **kw):
    rewards = torch.tensor([r for g in groups for r in g], dtype=torch.float32)
    group_of = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    adv, flat = group_advantages(rewards, group_of, **kw)
    return adv.tolist(), flat.tolist()


def test_advantages_groups_of_4_6_8_with_a_constant_group():
    adv, flat = _adv([[1, 0, 0, 1], [1, 0, 0, 0, 0, 0], [0.5] * 7 + [-0.1], [0.2] * 8])
    # group of 4: mean 0.5, population std 0.5
    assert adv[:4] == pytest.approx([1, -1, -1, 1], abs=1e-6)
    # group of 6: mean 1/6, population std sqrt(5)/6 -> sqrt(5) and -1/sqrt(5)
    assert adv[4:10] == pytest.approx([math.sqrt(5)] + [-1 / math.sqrt(5)] * 5, abs=1e-5)
    # group of 8: mean 0.425, population std sqrt(0.039375) -> 1/sqrt(7) and -sqrt(7)
    assert adv[10:18] == pytest.approx([1 / math.sqrt(7)] * 7 + [-math.sqrt(7)], abs=1e-5)
    # a constant group carries zero advantage and is flagged
    assert adv[18:] == [0.0] * 8
    assert flat == [False, False, False, True]


def test_sample_std_and_unscaled_and_nan_rewards():
    adv, _ = _adv([[1, 0, 0, 1]], std="sample")
    assert adv == pytest.approx([math.sqrt(3) / 2, -math.sqrt(3) / 2, -math.sqrt(3) / 2, math.sqrt(3) / 2], abs=1e-6)
    adv, _ = _adv([[1, 0, 0, 1]], scale=False)
    assert adv == pytest.approx([0.5, -0.5, -0.5, 0.5])
    # An unscored completion (NaN) gets 0 and is left out of the group's mean and std.
    adv, flat = _adv([[1, float("nan"), 0, 1]])
    m, s = 2 / 3, math.sqrt(2 / 9)
    assert adv == pytest.approx([(1 - m) / s, 0.0, (0 - m) / s, (1 - m) / s], abs=1e-5)
    # Two equal rewards and a NaN: no variance.
    assert _adv([[1, float("nan"), 1, 1]])[1] == [True]


def test_clipped_surrogate_matches_hand_values():
    ln = math.log
    # token 1: ratio 2 (clipped to 1.2), token 2: ratio 0.5 (clipped to 0.8)
    logps = torch.tensor([[ln(0.5), ln(0.25)]] * 2)
    old = torch.tensor([[ln(0.25), ln(0.5)]] * 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    per_seq, ratio, kl = spark_policy_loss(logps, old, None, adv, mask, 0.2, 0.2, beta=0.0)
    assert ratio[0].tolist() == pytest.approx([2.0, 0.5])
    assert kl is None
    # A=+1: -(min(2, 1.2) + min(0.5, 0.8)) / 2 = -(1.2 + 0.5) / 2
    assert float(per_seq[0]) == pytest.approx(-0.85)
    # A=-1: -(min(-2, -1.2) + min(-0.5, -0.8)) / 2 = (2 + 0.8) / 2
    assert float(per_seq[1]) == pytest.approx(1.4)
    # The mask selects tokens: only the first token of sequence 0 counts.
    per_seq, _, _ = spark_policy_loss(logps, old, None, adv, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert float(per_seq[0]) == pytest.approx(-1.2)


def test_k3_kl_matches_hand_values_and_has_no_ratio_correction():
    ln = math.log
    logps = torch.tensor([[ln(0.25), ln(0.5)]], requires_grad=True)
    ref = torch.tensor([[ln(0.5), ln(0.5)]])
    per_seq, ratio, kl = spark_policy_loss(logps, logps.detach(), ref, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1)
    # k3 = exp(d) - d - 1 with d = ref - logp = ln 2 for token 1, 0 for token 2
    assert kl[0].tolist() == pytest.approx([2 - ln(2) - 1, 0.0], abs=1e-6)
    assert float(per_seq[0].detach()) == pytest.approx(0.1 * (1 - ln(2)) / 2, abs=1e-7)
    # Plain k3 gradient: d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp), times beta / |o|.
    per_seq.sum().backward()
    assert logps.grad[0].tolist() == pytest.approx([0.1 * (1 - 2) / 2, 0.0], abs=1e-6)
    # On the first step (old = current, detached) the ratio is exactly 1.
    assert torch.equal(ratio, torch.ones_like(ratio))


@pytest.mark.parametrize("kwargs, message", [
    ({"min_generations": 1}, "min_generations must be at least 2"),
    ({"min_generations": 4, "max_generations": 2}, "max_generations"),
    ({"generation_increment": 0}, "generation_increment"),
    ({"num_generations": 8}, "num_generations"),
    ({"advantage_std": "robust"}, "advantage_std"),
    ({"aux_mode": "interleaved"}, "aux_mode"),
    ({"rollout_engine": "fast"}, "rollout_engine"),
    ({"aux_loss_scale": -1.0}, "aux_loss_scale"),
])
def test_config_rejects_settings_that_cannot_work(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        SparkGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **kwargs)


def test_config_defaults_are_the_study_s(tmp_path):
    args = SparkGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                           per_device_train_batch_size=4)
    assert (args.min_generations, args.generation_increment, args.max_generations) == (4, 2, 8)
    assert args.num_generations == 4 and args.adaptive
    assert args.advantage_std == "population" and args.advantage_epsilon == 1e-8
    assert args.adaptive_std_threshold == 1e-8 and args.epsilon == 0.2
    assert args.skip_zero_advantage == "group" and args.aux_loss_scale == 0.0
    assert (args.aux_pointwise_weight, args.aux_pairwise_weight, args.aux_reflection_weight) == (0.0, 0.1, 1.0)
    assert (args.aux_max_pointwise, args.aux_max_pairwise, args.aux_max_reflection) == (200, 200, 400)
    assert args.aux_batch_size == 2 and args.aux_mode == "phase"


def test_rollout_engine_auto_picks_the_fast_engine_only_where_it_can_run(tmp_path, monkeypatch):
    from spark_trl.configs import resolve_rollout_engine

    def cfg(**kw):
        return SparkGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, rollout_engine="auto",
                               per_device_train_batch_size=4, **kw)

    assert cfg().rollout_engine == "trl"  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = dict(use_cpu=False, use_vllm=False, fsdp="", deepspeed=None)
    assert resolve_rollout_engine(SimpleNamespace(**gpu)) == "spark"
    assert resolve_rollout_engine(SimpleNamespace(**{**gpu, "use_vllm": True})) == "trl"
    assert resolve_rollout_engine(SimpleNamespace(**{**gpu, "fsdp": "full_shard"})) == "trl"
    assert resolve_rollout_engine(SimpleNamespace(**{**gpu, "deepspeed": "zero2.json"})) == "trl"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolve_rollout_engine(SimpleNamespace(**gpu)) == "trl"


def test_covering_sampler_visits_all_311_problems_every_epoch():
    """TRL's RepeatSampler visits 308 of 311 problems per epoch with 4 prompts per generation batch."""
    from trl.trainer.utils import RepeatSampler

    from spark_trl.sampling import CoveringRepeatSampler

    pool = list(range(311))
    trl = RepeatSampler(pool, mini_repeat_count=4, batch_size=4, repeat_count=2, seed=42)
    ours = CoveringRepeatSampler(pool, mini_repeat_count=4, batch_size=4, repeat_count=2, seed=42)
    assert len(set(trl)) == 308
    for _ in range(2):  # two epochs: a fresh permutation each
        order = list(ours)
        assert len(order) == len(ours) == 78 * 4 * 4 * 2 and set(order) == set(pool)
        # Each generation batch is 4 prompts x 4 completions, repeated twice: one entry per prompt.
        first = [order[batch * 32 + 4 * j] for batch in range(78) for j in range(4)]
        assert first[311:] == first[:1]  # the last batch: 3 new problems and the epoch's first


def test_card_kl_is_the_mean_of_per_sequence_means_not_token_weighted():
    """A long sequence with a small KL and a short one with a large KL: the card's GRPO KL (mean over sequences of
    each sequence's token mean) and the token-weighted mean differ; padding rows (weight 0) count in neither."""
    kl = torch.tensor([[0.1] * 8, [0.9, 0.9] + [0.0] * 6, [5.0] * 8])
    mask = torch.tensor([[1.0] * 8, [1.0, 1.0] + [0.0] * 6, [1.0] * 8])
    token_sum, tokens, seq_sum, seqs = kl_sums(kl, mask, torch.tensor([1.0, 1.0, 0.0]))
    assert (tokens, seqs) == (10.0, 2.0)
    assert token_sum / tokens == pytest.approx((0.8 + 1.8) / 10)  # 0.26
    assert seq_sum / seqs == pytest.approx((0.1 + 0.9) / 2)  # 0.5


def test_outcomes_reach_the_trainer_through_a_declared_channel():
    """A reward function reports outcomes by declaring `last_outcomes` (the ReportsOutcomes protocol); one that holds
    a wrong number is a broken contract and an error, not silently ignored."""
    from spark_trl.groups import ReportsOutcomes, outcomes_of
    from spark_trl.outcome import ExecutionOutcome, Status

    def plain(completions, **kwargs):
        return [0.0] * len(completions)

    class Reporting:
        def __init__(self, n):
            self.last_outcomes = [ExecutionOutcome(status=Status.PASSED)] * n

    assert not isinstance(plain, ReportsOutcomes) and isinstance(Reporting(1), ReportsOutcomes)
    assert outcomes_of([plain], 2) == [None, None]
    assert [o.status for o in outcomes_of([plain, Reporting(2)], 2)] == [Status.PASSED] * 2
    with pytest.raises(RuntimeError, match="holds 3 outcomes after scoring 2 completions"):
        outcomes_of([Reporting(3)], 2)
