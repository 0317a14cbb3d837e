# Sourced by scripts/test.sh and scripts/demo.sh (from the repository root): makes sure $VENV (default .venv)
# exists with an up-to-date pip. PYTHON chooses the interpreter that creates it, SPARK_TRL_VENV the folder.
PY=${PYTHON:-python3}
VENV=${SPARK_TRL_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
