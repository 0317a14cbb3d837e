"""Condition C-reg2: GRPO + auxiliary recycling on the full pool, 311 problems, 6 iterations,
aux 0.02, KL 0.03, pairwise weight 0.05.

Settings common to every condition (model, QLoRA, optimizer, rollouts, rewards, seed) are the reference card's,
in ``spark_trl.runner.STUDY_DEFAULTS``; this file adds the condition's own. Any of them can be overridden:

    accelerate launch recipes/condition_c_reg2.py --output_dir runs/mine --max_train_problems 20
    python recipes/condition_c_reg2.py --config recipes/configs/smoke.yaml
    python recipes/condition_c_reg2.py --help
"""

import sys

from spark_trl.runner import recipe_main

RECIPE = dict(
    output_dir="runs/condition_c_reg2",
    max_train_problems=311,
    iterations=6,
    beta=0.03,  # kl_coeff
    aux_objective="recycling",
    aux_loss_scale=0.02,
    aux_pairwise_weight=0.05,
)

if __name__ == "__main__":
    sys.exit(recipe_main(RECIPE))
