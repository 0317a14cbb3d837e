"""Condition A-v2: exec-only GRPO on the full pool, 311 problems, 6 iterations, KL 0.02
(spark-code-A-3b-v2, the published adapter).

Settings common to every condition (model, QLoRA, optimizer, rollouts, rewards, seed) are the reference card's,
in ``spark_trl.runner.STUDY_DEFAULTS``; this file adds the condition's own. Any of them can be overridden:

    accelerate launch recipes/condition_a_v2.py --output_dir runs/mine --max_train_problems 20
    python recipes/condition_a_v2.py --config recipes/configs/smoke.yaml
    python recipes/condition_a_v2.py --help
"""

import sys

from spark_trl.runner import recipe_main

RECIPE = dict(
    output_dir="runs/condition_a_v2",
    max_train_problems=311,
    iterations=6,
    beta=0.02,  # kl_coeff
)

if __name__ == "__main__":
    sys.exit(recipe_main(RECIPE))
