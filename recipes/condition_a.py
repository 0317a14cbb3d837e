"""Condition A: exec-only GRPO, 200 problems, 3 iterations, KL 0.01 (spark-code-A-3b).

Settings common to every condition (model, QLoRA, optimizer, rollouts, rewards, seed) are the reference card's,
in ``spark_trl.runner.STUDY_DEFAULTS``; this file adds the condition's own. Any of them can be overridden:

    accelerate launch recipes/condition_a.py --output_dir runs/mine --max_train_problems 20
    python recipes/condition_a.py --config recipes/configs/smoke.yaml
    python recipes/condition_a.py --help
"""

import sys

from spark_trl.runner import recipe_main

RECIPE = dict(
    output_dir="runs/condition_a",
    max_train_problems=200,
    iterations=3,
    beta=0.01,  # kl_coeff
)

if __name__ == "__main__":
    sys.exit(recipe_main(RECIPE))
