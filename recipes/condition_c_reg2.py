"""Condition C-reg2: GRPO + auxiliary recycling on the full pool, 311 problems, 6 iterations,
aux 0.02, KL 0.03, pairwise weight 0.05.

Settings common to every condition (model, QLoRA, optimizer, rollouts, rewards, seed) are the reference card's,
in ``spark_trl.recipes.STUDY_DEFAULTS``, the condition's own in ``spark_trl.recipes.RECIPES`` (the one place
the values live). Any of them can be overridden:

    accelerate launch recipes/condition_c_reg2.py --output_dir runs/mine --max_train_problems 20
    python recipes/condition_c_reg2.py --config recipes/configs/smoke.yaml
    python recipes/condition_c_reg2.py --help
"""

import sys

from spark_trl.recipes import RECIPES, recipe_main

RECIPE = RECIPES["condition_c_reg2"]

if __name__ == "__main__":
    sys.exit(recipe_main(RECIPE))
