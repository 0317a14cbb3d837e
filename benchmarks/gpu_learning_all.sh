#!/usr/bin/env bash
# The whole learning benchmark of docs/benchmarks.md ("Learning") on one GPU, in the order it reports it:
#   1. the demo's GPU configuration, both reward modes x 3 seeds, all in parallel (6 iterations each);
#   2. time to accuracy: plain trl.GRPOTrainer alone, then SparkGRPOTrainer alone, each evaluated on the held-out
#      problems every few seconds of training (the clock stopped while it evaluates);
#   3. the report (tables, learning.png, time_to_accuracy.png), which needs matplotlib and no GPU.
# Needs the converted SmolLM2 in $SPARK_TRL_CACHE (`gpu_learning_bench.py convert`, once per machine).
#   bash benchmarks/gpu_learning_all.sh runs/learning
#   TEMPERATURE=0.7 bash benchmarks/gpu_learning_all.sh runs/learning-t07    # rollouts at another temperature
# (TEMPERATURE unset: the demo's GPU default, in every run.)
set -uo pipefail
OUT=${1:-runs/learning}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
TEMP=()
[ -n "${TEMPERATURE:-}" ] && TEMP=(--temperature "$TEMPERATURE")
$PY benchmarks/gpu_learning_bench.py learn --modes progress study --seeds 0 1 2 --out "$OUT/learn" \
    --deadline_s "${LEARN_DEADLINE_S:-1200}" "${TEMP[@]}"
$PY benchmarks/gpu_learning_bench.py plain --out "$OUT/plain" --budget_s "${PLAIN_BUDGET_S:-160}" --eval_every_s 40 \
    "${TEMP[@]}"
$PY benchmarks/gpu_learning_bench.py spark --out "$OUT/spark" --budget_s "${SPARK_BUDGET_S:-70}" --eval_every_s 10 \
    "${TEMP[@]}"
$PY -c "import matplotlib" 2>/dev/null && $PY benchmarks/gpu_learning_bench.py report --learn "$OUT/learn" \
    --plain "$OUT/plain" --spark "$OUT/spark" --out "$OUT/report"
echo "learning benchmark done: $OUT"
