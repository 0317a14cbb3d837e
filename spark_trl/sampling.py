"""The order in which an epoch visits the training problems.

TRL's `RepeatSampler` cuts each epoch's permutation into generation batches and drops the last, incomplete one: with
311 problems and 4 prompts per generation batch, 3 problems are never trained on in an epoch (the study trains on
every problem of an iteration). `CoveringRepeatSampler` keeps that batch and fills it with the first problems of
the same permutation, so every problem is visited at least once per epoch and a few (fewer than one generation
batch) twice.
"""

from __future__ import annotations

from trl.trainer.utils import RepeatSampler


class CoveringRepeatSampler(RepeatSampler):
    """`trl.trainer.utils.RepeatSampler` without the dropped remainder (same arguments, same generator use: one
    `torch.randperm` per epoch, so a resumed run can replay past epochs' permutations as before).

    Example:
    ```python
    >>> sampler = CoveringRepeatSampler(list(range(7)), mini_repeat_count=2, batch_size=3, shuffle=False)
    >>> list(sampler)
    [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 0, 0, 1, 1]
    ```
    """

    def __iter__(self):
        import torch

        n = self.num_samples
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).tolist()
        else:
            order = list(range(n))
        for start in range(0, self._num_batches() * self.batch_size, self.batch_size):
            chunk = [order[(start + j) % n] for j in range(self.batch_size)]
            for _ in range(self.repeat_count):
                for index in chunk:
                    for _ in range(self.mini_repeat_count):
                        yield index

    def _num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size) if self.num_samples else 0

    def __len__(self) -> int:
        return self._num_batches() * self.batch_size * self.mini_repeat_count * self.repeat_count
