"""A study's checkpoints: complete, atomic, resumable.

A checkpoint folder holds the adapter (or model) and tokenizer, the optimizer, scheduler, scaler and RNG states of
every process, the trainer state, whatever per-process state the caller adds (``extra``), and the study's own
state, written last: ``study_state.json`` marks the folder complete. Each is written to ``.tmp-<name>`` and
renamed into place, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

STUDY_STATE = "study_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def save_checkpoint(trainer, path: str | os.PathLike, study_state: dict, extra=None) -> Path:
    """Write a complete, resumable checkpoint to ``path`` atomically.

    Mirrors ``transformers.Trainer._save_checkpoint`` (adapter + tokenizer, optimizer, scheduler, scaler, RNG
    states, trainer state) but into a folder we name, through a temporary folder renamed into place, with the
    study's own state written last (its presence is the completeness marker).
    """
    import torch

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    trainer.save_model(str(tmp))  # adapter (or model) and the tokenizer (processing_class)
    # Private Trainer methods, reused rather than copied: they know FSDP/DeepSpeed/per-rank layouts.
    from .trl_private import save_training_state

    save_training_state(trainer, str(tmp))
    if extra is not None:  # per-rank state of the caller's
        extra(tmp)
    barrier()
    if is_main_process():
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        torch.save(trainer.args, tmp / "training_args.bin")
        write_json(tmp / STUDY_STATE, study_state)
        old = path.with_name(f".old-{path.name}")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def find_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The most advanced complete checkpoint under ``output_dir/checkpoints`` (a folder holding
    ``study_state.json``; ``.old-*`` folders are what an interrupted swap left), or None."""
    root = Path(output_dir) / "checkpoints"
    best, best_key = None, None
    for candidate in root.glob("*") if root.is_dir() else []:
        state_file = candidate / STUDY_STATE
        if candidate.name.startswith(".tmp-") or not state_file.is_file():
            continue
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        # Same step: prefer the one holding more evaluated iterations, then an iteration checkpoint.
        key = (state.get("global_step", -1), len(state.get("rows", [])), candidate.name.startswith("iter"))
        if best_key is None or key > best_key:
            best, best_key = candidate, key
    return best


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
