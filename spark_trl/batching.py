"""The training batch: which sequence each row of each micro-step shows, and the padded tensors TRL's loss reads.

Every rank must run the same number of micro-steps with the same number of rows (collective backends, DDP's
gradient all-reduce, FSDP's parameter gathers), whatever its groups left in the loss. A layout is therefore a list
of micro-steps of `rows` rows each, the same counts on every rank; a rank short of sequences fills rows with
padding: an exact copy of one of its sequences (so every log-prob computed on it is finite) that carries no weight
and no loss token, or a one-token dummy when it has no sequence at all.
"""

from __future__ import annotations

import math

import torch
from trl.trainer.utils import pad


def deal_round_robin(kept: list[int], n_micro: int) -> list[list[int]]:
    """TRL's layout (`rollout_schedule="batch"`): the (shuffled) sequences dealt round-robin over `n_micro`
    micro-steps, so that they differ by at most one real row.

    Example:
    ```python
    >>> deal_round_robin([5, 6, 7, 8, 9], n_micro=2)
    [[5, 7, 9], [6, 8]]
    ```
    """
    return [kept[j::n_micro] for j in range(n_micro)]


def deal_in_order(kept: list[int], n_steps: int, per_step: int, accumulation: int, rows: int) -> list[list[int]]:
    """The study's layout (`rollout_schedule="epoch"`): the sequences in rollout order, `per_step` per optimizer
    step, each step cut into `accumulation` micro-steps of `rows` rows.

    Example:
    ```python
    >>> deal_in_order([1, 2, 3, 4, 5], n_steps=2, per_step=4, accumulation=2, rows=2)
    [[1, 2], [3, 4], [5], []]
    ```
    """
    layout = []
    for step in range(n_steps):
        chunk = kept[step * per_step:(step + 1) * per_step]
        layout += [chunk[j * rows:(j + 1) * rows] for j in range(accumulation)]
    return layout


def rows_per_micro_step(local_max: int, n_micro: int) -> int:
    """Rows per micro-step for the batch layout, from the largest kept count over ranks."""
    return max(1, math.ceil(local_max / n_micro))


def pad_layout(layout: list[list[int]], rows: int, kept: list[int]) -> tuple[list[int | None], list[bool]]:
    """Flat (source sequence, is real) per row: each micro-step filled to `rows` rows with padding that repeats
    this rank's kept sequences (None: the dummy row, when it has none).

    Example:
    ```python
    >>> pad_layout([[4], []], rows=2, kept=[4])
    ([4, 4, 4, 4], [True, False, False, False])
    ```
    """
    src: list[int | None] = []
    real: list[bool] = []
    for j, chunk in enumerate(layout):
        fill = rows - len(chunk)
        src += list(chunk) + [kept[(j + f) % len(kept)] if kept else None for f in range(fill)]
        real += [True] * len(chunk) + [False] * fill
    return src, real


def build_tensors(src: list[int | None], real: list[bool], prompt_ids: list[list[int]],
                  completion_ids: list[list[int]], pad_id: int, eos_ids: set[int], mask_truncated: bool,
                  pad_to_multiple_of: int | None, device) -> dict[str, torch.Tensor]:
    """Left-padded prompts and right-padded completions, as TRL's `_compute_loss` reads them.

    `completion_mask` is TRL's (an empty completion, and with `mask_truncated` one without an EOS, are masked out);
    `tool_mask` marks the real rows: TRL's `_compute_loss` multiplies it into its loss mask, and so does spark's
    loss, so padding rows contribute no token."""
    p = [torch.tensor(prompt_ids[i] if i is not None else [pad_id]) for i in src]
    c = [torch.tensor((completion_ids[i] or [pad_id]) if i is not None else [pad_id]) for i in src]
    ptm = pad_to_multiple_of

    def padded(xs, value, side):
        return pad(xs, padding_value=value, padding_side=side, pad_to_multiple_of=ptm).to(device)

    completion_mask = padded([torch.ones_like(x) for x in c], 0, "right")
    attend = []
    for i in src:
        ok = i is None or len(completion_ids[i]) > 0
        if ok and i is not None and mask_truncated:
            ok = completion_ids[i][-1] in eos_ids
        attend.append(ok)
    completion_mask = completion_mask * torch.tensor(attend, device=device).unsqueeze(1).long()
    tool_mask = torch.tensor(real, device=device).unsqueeze(1).long().expand_as(completion_mask).contiguous()
    return {"prompt_ids": padded(p, pad_id, "left"), "prompt_mask": padded([torch.ones_like(x) for x in p], 0, "left"),
            "completion_ids": padded(c, pad_id, "right"), "completion_mask": completion_mask, "tool_mask": tool_mask}


def sampler_logps_rows(sampler_logps: list[list[float] | None], src: list[int | None], width: int) -> torch.Tensor:
    """The sampler's log-probs of each row's completion tokens, (rows, width) like `completion_ids`: NaN where
    unknown (padding columns, the dummy row, a completion without them).

    Example:
    ```python
    >>> sampler_logps_rows([[-0.5], None], src=[0, 1, None], width=2).tolist()
    [[-0.5, nan], [nan, nan], [nan, nan]]
    ```
    """
    out = torch.full((len(src), width), float("nan"))
    for j, i in enumerate(src):
        lp = sampler_logps[i] if i is not None else None
        if lp:
            out[j, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return out


def split_micro_batches(batch: dict, n_micro: int) -> list[dict]:
    """The batch cut into `n_micro` micro-batches of equal rows; 0-d tensors (batch-wide scalars) are shared."""
    rows = batch["prompt_ids"].size(0) // max(n_micro, 1)
    return [{k: (v[j * rows:(j + 1) * rows] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
            for j in range(n_micro)]
