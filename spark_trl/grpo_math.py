"""The arithmetic of the study's GRPO, as pure tensor functions (no trainer state, no processes).

    advantages     A_i  = (r_i - mean_g r) / (std_g r + eps)          within each group g, population std
    ratio          r_t  = exp(logp_t - logp_old_t)
    k3 KL          k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
    sequence loss  L_i  = 1/|o_i| sum_t [ -w_t min(r_t A_i, clip(r_t, 1 - eps_lo, 1 + eps_hi) A_i) + beta k3_t ]
    sampler weight w_t  = 1, or with the sampler correction exp(logp_old_t - logp_sampler_t) truncated or masked

`SparkGRPOTrainer` weighs the L_i of an optimizer step and sums them (see its `_spark_loss`); the functions here
return sums rather than means wherever figures are later added over micro-steps and processes.
"""

from __future__ import annotations

import math

import torch


def group_advantages(rewards: torch.Tensor, group_of: torch.Tensor, std: str = "population", epsilon: float = 1e-8,
                     threshold: float = 1e-8, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages z-scored within each group (groups may differ in size), and which groups have no variance.

    A group whose finite rewards have population std <= `threshold` gets zero advantages; NaN rewards (no reward
    function scored the completion) get zero and are left out of the group's mean and std.

    Example:
    ```python
    >>> adv, flat = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0]), torch.tensor([0, 0, 0, 0, 1, 1]))
    >>> [round(a, 4) for a in adv.tolist()], flat.tolist()
    ([1.0, -1.0, 1.0, -1.0, 0.0, 0.0], [False, True])
    ```
    """
    n_groups = int(group_of.max()) + 1 if group_of.numel() else 0
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    no_variance = torch.zeros(n_groups, dtype=torch.bool)
    for g in range(n_groups):
        idx = (group_of == g).nonzero(as_tuple=True)[0]
        r = rewards[idx].float()
        no_variance[g] = group_std(r, "population") <= threshold
        if no_variance[g]:
            continue
        adv = r - torch.nanmean(r)
        if scale:
            adv = adv / (group_std(r, std) + epsilon)
        advantages[idx] = torch.nan_to_num(adv, nan=0.0)
    return advantages, no_variance


def group_std(r: torch.Tensor, kind: str = "population") -> float:
    """Std of a group's finite rewards: population (divide by n) or sample (n - 1); 0 with fewer than 2."""
    r = r[~torch.isnan(r)]
    if r.numel() < 2:
        return 0.0
    return float(r.double().std(correction=0 if kind == "population" else 1))


def in_loss(advantages: torch.Tensor, no_variance: torch.Tensor, group_of: torch.Tensor, rule: str,
            epsilon: float = 1e-8) -> torch.Tensor:
    """Which sequences enter the loss (`skip_zero_advantage`): "none" all, "group" those of groups with reward
    variance, "sequence" also only those with |A| >= epsilon (the study's rule).

    Example:
    ```python
    >>> adv, flat = group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), torch.tensor([0, 0, 1, 1]))
    >>> in_loss(adv, flat, torch.tensor([0, 0, 1, 1]), "group").tolist()
    [True, True, False, False]
    ```
    """
    if rule == "none":
        return torch.ones_like(advantages, dtype=torch.bool)
    if rule == "group":
        return ~no_variance.to(group_of.device)[group_of]
    return advantages.abs() >= epsilon


def spark_policy_loss(logps, old_logps, ref_logps, advantages, mask, epsilon_low=0.2, epsilon_high=0.2, beta=0.0,
                      sampler_weights=None):
    r"""The study's per-sequence loss (PPO-clip surrogate plus the k3 KL estimator), as in the GRPO paper:

        r_t   = exp(logp_t - logp_old_t)
        k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
        L_i   = 1/|o_i| sum_t [ -w_t min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t ]

    The KL is the plain k3 estimator: no importance-ratio correction (TRL's `use_bias_correction_kl`).
    `sampler_weights` w ((B, T) or (B, 1), from `sampler_importance_weights`; None = 1) multiplies the surrogate
    only, not the KL, where TRL multiplies its per-token loss by `importance_sampling_ratio` (before adding the KL).
    Returns (L_i of shape (B,), r of shape (B, T), k3 of shape (B, T) or None when beta == 0).

    Example:
    ```python
    >>> logps = torch.log(torch.tensor([[0.5, 0.25]]))
    >>> loss, ratio, kl = spark_policy_loss(logps, logps, None, torch.tensor([1.0]), torch.ones(1, 2))
    >>> float(loss[0]), float(ratio.mean())
    (-1.0, 1.0)
    ```
    """
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if sampler_weights is not None:
        per_token = per_token * sampler_weights
    kl = None
    if beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    maskf = mask.to(per_token.dtype)
    per_seq = (per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)
    return per_seq, ratio, kl


SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_importance_weights(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                               mode: str = "sequence_mask", clip_min: float | None = None,
                               clip_max: float | None = 3.0) -> torch.Tensor:
    r"""The importance weight that corrects for sampling from a sampler that is not the training model (the fast
    engine's bf16 dense copy, or vLLM, against a 4-bit QLoRA trainer), TRL's `vllm_importance_sampling_*`:

        d_t     = (logp_old_t - logp_sampler_t) * mask_t          NaN (sampler log-prob unknown) -> 0, i.e. w = 1
        token_*     rho_t = exp(d_t)                               one weight per token, shape (B, T)
        sequence_*  rho_i = exp(sum_t d_t)                         the sequence's likelihood ratio, shape (B, 1)
        *_truncate  w = clamp(rho, clip_min, clip_max)             truncated IS (bias for variance)
        *_mask      w = rho where clip_min <= rho <= clip_max, else 0   drops the samples the trainer disowns

    logp_old is the training model's log-prob of the sampled token *at generation time*: the weight turns an
    expectation under the sampler into one under the policy that the PPO ratio r_t = exp(logp_t - logp_old_t)
    starts from. A bound that is None is no bound. The weight is a constant (no gradient flows through it).

    Example:
    ```python
    >>> old, samp = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.25, 0.2]]))
    >>> sampler_importance_weights(old, samp, torch.ones(1, 2), "token_truncate", None, 1.5).tolist()
    [[1.5, 1.0]]
    >>> sampler_importance_weights(old, samp, torch.ones(1, 2), "sequence_mask", None, 3.0).tolist()
    [[2.0]]
    ```
    """
    if mode not in SAMPLER_IS_MODES:
        raise ValueError(f"mode must be one of {list(SAMPLER_IS_MODES)}, got {mode!r}")
    diff = torch.nan_to_num((old_logps.float() - sampler_logps.float()) * mask.float(), nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    rho = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(rho, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return rho.masked_fill((rho < low) | (rho > high), 0.0)


def sampler_mismatch_sums(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                          rows: torch.Tensor) -> list[float]:
    """[sum of |logp_old - logp_sampler|, tokens, max] over the masked tokens of the `rows` (bool, (B,)) whose
    sampler log-prob is known (NaN ones are left out, as TRL does): the sums behind
    `sampling/sampling_logp_difference/mean` and `/max`, so that ranks can be added before dividing.

    Example:
    ```python
    >>> sampler_mismatch_sums(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, float("nan")]]), torch.ones(1, 2),
    ...                       torch.tensor([True]))
    [0.5, 1.0, 0.5]
    ```
    """
    delta = (old_logps.float() - sampler_logps.float()).abs()
    keep = mask.bool() & rows.unsqueeze(1) & ~torch.isnan(delta)
    delta = delta[keep]
    return [float(delta.sum()), float(delta.numel()), float(delta.max()) if delta.numel() else 0.0]


def sampler_weight_figures(weights: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> list[float]:
    """[sum, count, min, max] of the sampler weights that act: per masked token of the `rows` (token modes) or per
    row (sequence modes, weights of shape (B, 1)): `sampling/importance_sampling_ratio/*`.

    Example:
    ```python
    >>> sampler_weight_figures(torch.tensor([[2.0, 0.5, 9.0]]), torch.tensor([[1, 1, 0]]), torch.tensor([True]))
    [2.5, 2.0, 0.5, 2.0]
    ```
    """
    if weights.size(1) == 1:
        flat = weights[rows, 0]
    else:
        flat = weights[mask.bool() & rows.unsqueeze(1)]
    flat = flat.float()
    if not flat.numel():
        return [0.0, 0.0, math.inf, -math.inf]
    return [float(flat.sum()), float(flat.numel()), float(flat.min()), float(flat.max())]


def clip_sums(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2) -> list[float]:
    """[sum of r_t, tokens, tokens clipped low (r < 1 - eps_lo, A < 0), tokens clipped high (r > 1 + eps_hi, A > 0)]
    over the masked tokens: the sums behind TRL's `ratio_mean` and `clip_ratio/*` metrics.

    Example:
    ```python
    >>> clip_sums(torch.tensor([[0.5, 1.0], [1.5, 1.0]]), torch.tensor([-1.0, 1.0]), torch.ones(2, 2))
    [4.0, 4.0, 1.0, 1.0]
    ```
    """
    mask = mask.float()
    adv = advantages.unsqueeze(1)
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).float()
    return [float((ratio.float() * mask).sum()), float(mask.sum()), float((low * mask).sum()),
            float((high * mask).sum())]


def kl_sums(kl: torch.Tensor, mask: torch.Tensor, seq_weight: torch.Tensor) -> list[float]:
    """Sums for the two averages of a per-token KL (B, T) over the sequences in the loss (seq_weight 1):

        token-weighted  = sum_i sum_t kl_it / sum_i |o_i|                        (TRL's logged "kl")
        sequence mean   = 1/N sum_i (1/|o_i| sum_t kl_it)                      (the reference card's "GRPO KL")

    Returns [sum of kl over tokens, tokens, sum of the sequences' token means, sequences N]; sums, so that ranks
    and micro-steps can be added before dividing.

    Example:
    ```python
    >>> kl_sums(torch.tensor([[0.1, 0.3], [0.5, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.ones(2))
    [0.9, 3.0, 0.7, 2.0]
    ```
    """
    mask = mask.float()
    counted = (mask.sum(-1) > 0).float() * seq_weight.float()
    mask = mask * counted.unsqueeze(1)
    per_seq = (kl.float() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return [round(float(x), 12) for x in ((kl.float() * mask).sum(), mask.sum(), per_seq.sum(), counted.sum())]
