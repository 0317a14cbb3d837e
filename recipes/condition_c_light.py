"""Condition C-light: GRPO + auxiliary recycling, 200 problems, 3 iterations, aux 0.10, KL 0.01.

Settings common to every condition (model, QLoRA, optimizer, rollouts, rewards, seed) are the reference card's,
in ``spark_trl.runner.STUDY_DEFAULTS``; this file adds the condition's own. Any of them can be overridden:

    accelerate launch recipes/condition_c_light.py --output_dir runs/mine --max_train_problems 20
    python recipes/condition_c_light.py --config recipes/configs/smoke.yaml
    python recipes/condition_c_light.py --help
"""

import sys

from spark_trl.runner import recipe_main

RECIPE = dict(
    output_dir="runs/condition_c_light",
    max_train_problems=200,
    iterations=3,
    beta=0.01,  # kl_coeff
    aux_objective="recycling",
    aux_loss_scale=0.10,
)

if __name__ == "__main__":
    sys.exit(recipe_main(RECIPE))
