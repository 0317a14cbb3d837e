"""Silence the messages that spark-trl's own use of its libraries triggers, so that a run prints what a person reads.

Each filter names one message and the module that emits it; nothing else is hidden (no blanket ignore, no
change of log levels). ``install()`` runs when ``spark_trl`` is imported, before anything imports bitsandbytes.

* bitsandbytes (0.50), at import on CPUs with AVX512-BF16, tries to fetch a CPU kernel from the Hugging Face hub
  through the ``kernels`` package and, when it cannot, says ``Failed to load CPU gemm_4bit_forward from
  kernels-community: ...`` and uses its own CPU kernel, which is what spark-trl runs on CPU. Dropped when the
  package is missing or the hub cannot give the kernel (the error raised inside ``kernels`` or
  ``huggingface_hub``: offline, unreachable, publisher not trusted); any other failure still warns.
  transformers 5.25 installs ``kernels`` with itself, so every offline CPU run also printed that package's own
  ``Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' ...``: that one line, for
  that one repository, is dropped too.
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
_BNB_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
_KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
_HUB_PACKAGES = ("kernels", "huggingface_hub")


def _raised_in(exc: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether the innermost frame of ``exc``'s traceback runs code of one of ``packages``."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    return module.split(".", 1)[0] in packages


class _NoHubKernel(logging.Filter):
    """Drops bitsandbytes' notice that it could not get its CPU kernel from the hub (package missing, hub
    unreachable or the kernel refused), after which it runs its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_BNB_MESSAGE):
            return True
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if not isinstance(cause, BaseException):
            return True
        missing = isinstance(cause, ImportError) and getattr(cause, "name", None) == "kernels"
        return not (missing or _raised_in(cause, _HUB_PACKAGES))


class _OfflineTrustNotice(logging.Filter):
    """Drops the ``kernels`` package's offline notice for bitsandbytes' kernel repository only."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("Skipping publisher trust check") and _BNB_KERNEL_REPO in message)


_installed = False


def install() -> None:
    """Add the filters (once per process; warnings filters survive ``importlib.reload``)."""
    global _installed
    for category in (SyntaxWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_FOREIGN_CODE_MODULES)
    warnings.filterwarnings("ignore", message=_CHECKPOINTING_RENAME, category=FutureWarning,
                            module=r"transformers\.(modeling_utils|training_args)\Z")
    if not _installed:
        logging.getLogger(_BNB_LOGGER).addFilter(_NoHubKernel())
        logging.getLogger(_KERNELS_HUB_LOGGER).addFilter(_OfflineTrustNotice())
        _installed = True
