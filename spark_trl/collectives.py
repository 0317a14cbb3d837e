"""Reductions over the training processes, for figures and decisions that every rank must share.

Every method is a collective: all ranks must call it, in the same order. With one process they cost nothing.
"""

from __future__ import annotations

from typing import Any


class Ranks:
    """Sums, maxima and unions over the processes of an `accelerate.Accelerator`.

    Example:
    ```python
    >>> from accelerate import Accelerator
    >>> ranks = Ranks(Accelerator(cpu=True))
    >>> ranks.sum([1.0, 2.0]), ranks.max(3), ranks.union(["b", "a"])
    ([1.0, 2.0], 3, ['a', 'b'])
    ```
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64, so counts stay exact)."""
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    def max(self, value: int) -> int:
        if self.world == 1:
            return int(value)
        import torch

        t = torch.tensor([value], dtype=torch.long, device=self.accelerator.device)
        return int(self.accelerator.gather(t).max().item())

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def union(self, items) -> list:
        """The sorted union of every rank's `items`."""
        return sorted({x for part in self.gather(list(items)) for x in part})
