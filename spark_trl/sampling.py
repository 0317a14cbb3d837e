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


def epoch_order(n: int, epoch: int, seed: int | None = None, shuffle: bool = True) -> list[int]:
    """The problems of `epoch` (0-based) in the order `rollout_schedule="epoch"` visits them: every one of the `n`
    once, in a permutation drawn like `CoveringRepeatSampler` draws them (one `torch.randperm` per epoch from a
    generator seeded with `seed`), so that a resumed run finds the same order without replaying past epochs.

    Example:
    ```python
    >>> epoch_order(5, epoch=0, shuffle=False)
    [0, 1, 2, 3, 4]
    >>> sorted(epoch_order(5, epoch=1, seed=42)) == [0, 1, 2, 3, 4]
    True
    ```
    """
    import torch

    if not shuffle:
        return list(range(n))
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    for _ in range(epoch):
        torch.randperm(n, generator=generator)
    return torch.randperm(n, generator=generator).tolist()


class EpochTicks:
    """The training "data" of `rollout_schedule="epoch"`: item i is the micro-step index i // world within the
    epoch, so that with accelerate's sharding (process r takes items r, r + world, ...) every process counts its
    micro-steps 0, 1, 2, ... The epoch's problems are drawn by the trainer itself (`epoch_order`)."""

    def __init__(self, micro_steps: int, world: int):
        self.micro_steps, self.world = micro_steps, world

    def __len__(self) -> int:
        return self.micro_steps * self.world

    def __getitem__(self, i: int) -> int:
        return i // self.world
