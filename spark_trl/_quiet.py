"""Silence the messages that spark-trl's own use of its libraries triggers, so that a run prints what a person reads.

Each filter names one message and the module that emits it; nothing else is hidden (no blanket ignore, no
change of log levels). ``install()`` runs when ``spark_trl`` is imported, before anything imports bitsandbytes.

* bitsandbytes (0.50), at import on CPUs with AVX512-BF16: ``Failed to load CPU gemm_4bit_forward from
  kernels-community: No module named 'kernels'``. The optional ``kernels`` package would download a kernel from
  the Hugging Face hub; without it bitsandbytes uses its own CPU kernel, which is what spark-trl runs on CPU.
  Only the missing-package case is dropped: with ``kernels`` installed, a failed download still warns.
* transformers 5 renamed ``gradient_checkpointing*`` to ``activation_checkpointing*`` and warns (FutureWarning) on
  every use of the old names. TRL 1.16 and PEFT use them internally: TRL's configs default
  ``gradient_checkpointing=True``, and GRPOTrainer reads ``model.is_gradient_checkpointing`` and toggles
  ``gradient_checkpointing_disable/enable`` around every generation, so a run repeated the warning at each step.
* Compiling dataset and model-written code warns about that code (``invalid escape sequence '\\d'`` in an MBPP
  reference: a SyntaxWarning since Python 3.12, a DeprecationWarning before). spark-trl compiles such code only
  under the pseudo file names below, so the filter matches those names and nothing of the user's own code.
  (The sandbox's judge processes are separate interpreters, which these filters do not reach.)
"""

from __future__ import annotations

import logging
import warnings

# The file names spark-trl passes to compile()/ast.parse for code that is not its own: dataset code (MBPP
# references, HumanEval prompts and tests), model completions, and the sandbox's programs, setups and tests.
_FOREIGN_CODE_MODULES = r"<(dataset|completion|program|setup|test( \d+)?)>\Z"
_CHECKPOINTING_RENAME = r"`(is_)?gradient_checkpointing\w*` is deprecated and will be removed in v6"
_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _MissingKernelsPackage(logging.Filter):
    """Drops bitsandbytes' notice that the optional ``kernels`` package is not installed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_BNB_MESSAGE):
            return True
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (isinstance(cause, ImportError) and getattr(cause, "name", None) == "kernels")


_installed = False


def install() -> None:
    """Add the filters (once per process; warnings filters survive ``importlib.reload``)."""
    global _installed
    for category in (SyntaxWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_FOREIGN_CODE_MODULES)
    warnings.filterwarnings("ignore", message=_CHECKPOINTING_RENAME, category=FutureWarning,
                            module=r"transformers\.(modeling_utils|training_args)\Z")
    if not _installed:
        logging.getLogger(_BNB_LOGGER).addFilter(_MissingKernelsPackage())
        _installed = True
