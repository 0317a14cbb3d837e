"""Measuring the sampler against the trainer: the training model's log-probs of sampled completions, and the gap.

The engine keeps its own log-probs of the sampled tokens (``FastRolloutEngine.last_logprobs``: ``logits /
temperature`` at the sampled token, before truncation, as TRL computes them); the training model's come from
:func:`completion_logprobs`, and :func:`logprob_mismatch` sums up the difference (docs/benchmarks.md reports it).
"""

from __future__ import annotations

import math

import torch

from .decoder import _unwrap


def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                        temperature: float = 1.0, batch_size: int = 8) -> list[list[float]]:
    """Per-token log-probs of completions under ``model`` (logits / temperature), as GRPOTrainer computes them.

    Used to measure the sampler/trainer mismatch: mean |logp_sampler - logp_trainer| per token.

    Example:
        >>> completion_logprobs(model, [[1, 2]], [[3, 4]])  # doctest: +SKIP
        [[-5.71, -5.69]]
    """
    device = next(_unwrap(model).parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(prompt_ids), batch_size):
            ps, cs = prompt_ids[i:i + batch_size], completion_ids[i:i + batch_size]
            width = max(len(p) + len(c) for p, c in zip(ps, cs))
            ids = torch.zeros(len(ps), width, dtype=torch.long)
            mask = torch.zeros(len(ps), width, dtype=torch.long)
            for r, (p, c) in enumerate(zip(ps, cs)):
                seq = p + c
                ids[r, width - len(seq):] = torch.tensor(seq)  # left padding, as TRL does
                mask[r, width - len(seq):] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float() / temperature
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids.to(device)[:, 1:, None])[..., 0]
            for r, c in enumerate(cs):
                out.append(logp[r, width - 1 - len(c):].tolist() if c else [])
    return out


def logprob_mismatch(sampler: list[list[float]], trainer: list[list[float]]) -> dict:
    """Mean and max |logp_sampler - logp_trainer| per completion token.

    Example:
        >>> logprob_mismatch([[-1.0, -2.0]], [[-1.5, -2.0]])
        {'mean_abs': 0.25, 'max_abs': 0.5, 'tokens': 2}
    """
    diffs = [abs(a - b) for s, t in zip(sampler, trainer) for a, b in zip(s, t)]
    if not diffs:
        return {"mean_abs": math.nan, "max_abs": math.nan, "tokens": 0}
    return {"mean_abs": sum(diffs) / len(diffs), "max_abs": max(diffs), "tokens": len(diffs)}
