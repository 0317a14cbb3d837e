"""Shared fixtures: the tiny offline model and the real data files. No test needs the hub.

MBPP-sanitized ships with the tests (``tests/data/``, CC BY 4.0, see its README); ``SPARK_TRL_MBPP`` set in the
environment overrides it. Either way the variable is exported, so that commands the tests start read the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MBPP = REPO / "tests" / "data" / "sanitized-mbpp.json"
MBPP_PATH = Path(os.environ.get("SPARK_TRL_MBPP") or SHIPPED_MBPP)
os.environ["SPARK_TRL_MBPP"] = str(MBPP_PATH)


def pytest_configure(config):
    # spark-trl installs its warning filters when imported; pytest imports it inside collection's own
    # catch_warnings, which drops them again. Installed here, before collection, they hold for every test.
    from spark_trl import _quiet

    _quiet.install()


@pytest.fixture(scope="session")
def mbpp_path() -> Path:
    if not MBPP_PATH.is_file():
        pytest.fail(f"MBPP-sanitized not found at {MBPP_PATH} (SPARK_TRL_MBPP names a missing file, or "
                    f"tests/data/ is incomplete)")
    return MBPP_PATH


@pytest.fixture(scope="session")
def mbpp_problems(mbpp_path):
    from spark_trl.data import load_mbpp

    return load_mbpp(mbpp_path)


@pytest.fixture(scope="session")
def humaneval_problems():
    from spark_trl.data import load_humaneval

    return load_humaneval()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A tiny Qwen2-architecture causal LM + ChatML tokenizer, saved with save_pretrained (TRL needs a path
    when beta > 0 without PEFT)."""
    from spark_trl.testing import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2")))
