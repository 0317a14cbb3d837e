"""spark-trl's use of TRL internals is listed in spark_trl/trl_private.py; these tests fail loudly when TRL moves
one of them, and check that no other module reaches into TRL's or the Trainer's private names."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import trl

from spark_trl import trl_private

PACKAGE = Path(trl_private.__file__).parent


def test_every_listed_private_is_where_it_was_read():
    trl_private.check()  # raises, naming each one that moved
    assert trl.__version__ == trl_private.TRL_VERSION_READ, (
        f"TRL {trl.__version__} installed, spark_trl/trl_private.py was read from {trl_private.TRL_VERSION_READ}: "
        "re-read the listed privates and update TRL_VERSION_READ")


def test_check_names_what_moved(monkeypatch):
    from trl import GRPOTrainer

    monkeypatch.delattr(GRPOTrainer, "_tokenize_prompts")
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", lambda self, prompts, n: None)
    with pytest.raises(RuntimeError) as err:
        trl_private.check()
    message = str(err.value)
    assert "GRPOTrainer._tokenize_prompts is gone" in message
    assert "GRPOTrainer._generate_single_turn takes ['prompts', 'n']" in message
    assert "TRL 1.16.0" in message


def _private_attribute_uses(path: Path) -> set[str]:
    """Names `x._name` accessed in a module, on anything but `self`/`cls` of spark-trl's own classes."""
    tree = ast.parse(path.read_text())
    own = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    own_attrs = {t.attr for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                 for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                 if isinstance(t, ast.Attribute)}
    own_methods = {f.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for f in node.body
                   if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if node.attr in own_attrs or node.attr in own_methods or node.attr in own:
                continue
            used.add(node.attr)
    return used


def test_no_module_but_the_adapter_uses_trl_or_trainer_privates():
    """Every `_name` that trainer-side modules access must be their own (assigned or defined there) or go through
    spark_trl.trl_private."""
    for name in ("trainer.py", "trainer_checks.py", "aux_training.py", "groups.py", "batching.py", "stats.py",
                 "sampling.py", "grpo_math.py", "collectives.py", "recycling.py", "runner.py", "checkpoints.py",
                 "study_trainer.py", "recipes.py", "models.py", "results.py"):
        # Every private in use, listed or not: a new private must be added to the adapter to be used at all.
        leaked = _private_attribute_uses(PACKAGE / name)
        overridden = {n for n in leaked if n in trl_private.GRPO_METHODS and f"def {n}(" in (PACKAGE / name).read_text()}
        assert leaked - overridden == set(), f"{name} uses {sorted(leaked - overridden)} outside trl_private"


def test_overrides_keep_trl_s_signatures():
    from spark_trl import SparkGRPOTrainer

    for name in ("_generate_and_score_completions", "_compute_loss", "_prepare_inputs", "_get_train_sampler"):
        ours = list(inspect.signature(getattr(SparkGRPOTrainer, name)).parameters)
        assert ours[1:] == list(trl_private.GRPO_METHODS[name]), name
