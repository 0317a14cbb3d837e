#!/usr/bin/env bash
# The test command of the README: creates .venv (if absent), installs spark-trl with its dev extra
# (torch pinned to the CPU build on machines without a GPU) and runs the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k reward`. The data the tests need ship in tests/data/
# (SPARK_TRL_MBPP, when set, names another MBPP-sanitized file).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
"$VENV/bin/python" -m pip install -q -e ".[dev]" -c constraints-cpu.txt
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" -m flake8 .
# pytest exits 5 when it collects no test: with `set -e` that fails this script, as it should.
"$VENV/bin/python" -m pytest "$@"
