"""Condition C-light: GRPO + auxiliary recycling, 200 problems, 3 iterations, aux 0.10, KL 0.01.

Settings common to every condition (model, QLoRA, optimizer, rollouts, rewards, seed) are the reference card's,
in ``spark_trl.recipes.STUDY_DEFAULTS``, the condition's own in ``spark_trl.recipes.RECIPES`` (the one place
the values live). Any of them can be overridden:

    accelerate launch recipes/condition_c_light.py --output_dir runs/mine --max_train_problems 20
    python recipes/condition_c_light.py --config recipes/configs/smoke.yaml
    python recipes/condition_c_light.py --help
"""

import sys

from spark_trl.recipes import RECIPES, recipe_main

RECIPE = RECIPES["condition_c_light"]

if __name__ == "__main__":
    sys.exit(recipe_main(RECIPE))
