"""`StudyTrainer`: the `SparkGRPOTrainer` that the study runner builds, with its crash safety in the training step."""

from __future__ import annotations

import logging

from .evaluation import free_memory, oom_errors
from .runner import StudyOOMError
from .trainer import SparkGRPOTrainer

logger = logging.getLogger("spark_trl.runner")

class StudyTrainer(SparkGRPOTrainer):
    """`SparkGRPOTrainer` whose training step survives a transient out-of-memory error: it frees memory and retries
    the micro-batch from the gradients it started from, `oom_retries` times, then raises `StudyOOMError` (the
    runner writes an emergency checkpoint). With several processes there is no retry: one rank repeating a step
    would repeat collectives (gradient all-reduce, metric reductions) the others have passed."""

    def __init__(self, *args, oom_retries: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.oom_retries = oom_retries
        if self.accelerator.num_processes > 1 and oom_retries:
            logger.warning("oom_retries=%d ignored with %d processes: an OOM writes an emergency checkpoint",
                           oom_retries, self.accelerator.num_processes)
            self.oom_retries = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Wraps SparkGRPOTrainer.training_step (where TRL also generates) with the retry described above.
        retries = self.oom_retries
        for attempt in range(retries + 1):
            params = [p for p in model.parameters() if p.requires_grad]
            saved = [None if p.grad is None else p.grad.detach().clone() for p in params] if retries else None
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            except oom_errors() as exc:
                if saved is not None:
                    for p, g in zip(params, saved):
                        p.grad = g
                free_memory()
                logger.warning("out of memory in training step %d (attempt %d of %d): %s",
                               self.state.global_step + 1, attempt + 1, retries + 1, exc)
                if attempt == retries:
                    raise StudyOOMError(f"out of memory in training step {self.state.global_step + 1} after "
                                        f"{retries} retries") from exc
