"""spark-trl: execution-grounded GRPO for code generation, as a TRL extension."""

__version__ = "0.1.0"

from . import _quiet

_quiet.install()  # before the imports below load bitsandbytes and transformers

from .data import Problem, load_benchmark, load_humaneval, load_mbpp, split_mbpp, to_grpo_dataset  # noqa: F401
from .prompts import SYSTEM_PROMPT, extract_code  # noqa: F401
from .configs import SparkGRPOConfig  # noqa: F401
from .trainer import SparkGRPOTrainer  # noqa: F401
from .reward import ExecutionReward  # noqa: F401
from .code_eval import code_eval_path  # noqa: F401
