"""spark-trl's commands print no library noise that its own use of the libraries triggers, and hide nothing else
(spark_trl/_quiet.py): each filter is checked against the message it targets and against a near miss."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import warnings

import pytest

from spark_trl import _quiet

ESCAPE = "import re\n\ndef digits(s):\n    return re.findall('\\d+', s)\n"  # '\d': an invalid escape sequence


@contextlib.contextmanager
def recorded(install: bool = True):
    """Every warning raised in the body, with only spark-trl's filters (or none) in front of 'always'."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        if install:
            _quiet.install()
        warnings.simplefilter("always", append=True)
        yield caught


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_a_training_config_and_a_tiny_model_start_quietly(tiny_model_path):
    """What every CPU command does first (import spark-trl, build TRL's config, load a model, the checks TRL makes
    around generation), with every warning shown: none of the targeted messages is printed."""
    stderr = _python(
        "import spark_trl\n"
        "from transformers import AutoModelForCausalLM\n"
        "from spark_trl import SparkGRPOConfig\n"
        "SparkGRPOConfig(output_dir='unused', use_cpu=True, report_to='none')\n"
        f"m = AutoModelForCausalLM.from_pretrained({tiny_model_path!r})\n"
        "m.gradient_checkpointing_enable(); assert m.is_gradient_checkpointing; m.gradient_checkpointing_disable()\n")
    assert "kernels-community" not in stderr
    assert "gradient_checkpointing" not in stderr


def _raised_by(module: str, exc: BaseException) -> BaseException:
    """``exc`` as raised by code whose module is ``module`` (its traceback's innermost frame)."""
    namespace = {"__name__": module}
    exec("def fail(exc):\n    raise exc\n", namespace)
    try:
        namespace["fail"](exc)
    except BaseException as caught:  # noqa: BLE001
        return caught
    raise AssertionError("unreachable")


def _logged(logger_name: str, calls) -> list[str]:
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler = Keep()
    logger.addHandler(handler)
    try:
        for msg, *args in calls:
            logger.warning(msg, *args)
    finally:
        logger.removeHandler(handler)
    return records


def test_bitsandbytes_notice_dropped_only_when_the_hub_kernel_cannot_be_had():
    fmt = _quiet._BNB_MESSAGE + ": %s. Please make sure ..."
    missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
    offline = _raised_by("kernels._internals.hf_hub", OSError("not in the local cache and the hub is offline"))
    untrusted = _raised_by("huggingface_hub.hf_api", ValueError("could not verify publisher trust status"))
    other = ModuleNotFoundError("No module named 'triton'", name="triton")  # not the hub's doing: still said
    elsewhere = _raised_by("bitsandbytes.backends.cpu.ops", RuntimeError("kernel failed"))
    records = _logged(_quiet._BNB_LOGGER, [(fmt, missing), (fmt, offline), (fmt, untrusted), (fmt, other),
                                            (fmt, elsewhere), ("another bitsandbytes warning",)])
    assert records == [f"{_quiet._BNB_MESSAGE}: No module named 'triton'. Please make sure ...",
                       f"{_quiet._BNB_MESSAGE}: kernel failed. Please make sure ...",
                       "another bitsandbytes warning"]


def test_kernels_offline_notice_dropped_only_for_the_bitsandbytes_kernel():
    records = _logged(_quiet._KERNELS_HUB_LOGGER, [
        (f"Skipping publisher trust check for '{_quiet._BNB_KERNEL_REPO}' because Hugging Face Hub is in offline "
         "mode.",),
        ("Skipping publisher trust check for 'someone/their-kernel' because Hugging Face Hub is in offline mode.",),
        (f"another notice about '{_quiet._BNB_KERNEL_REPO}'",)])
    assert records == [
        "Skipping publisher trust check for 'someone/their-kernel' because Hugging Face Hub is in offline mode.",
        f"another notice about '{_quiet._BNB_KERNEL_REPO}'"]


def test_bitsandbytes_notice_is_gone_where_bitsandbytes_prints_it():
    if "kernels-community" not in _python("import bitsandbytes"):
        pytest.skip("bitsandbytes does not look for the kernels package on this CPU (no AVX512-BF16)")
    assert "kernels-community" not in _python("import spark_trl, bitsandbytes")


def test_checkpointing_rename_warnings_hidden_only_from_transformers(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with recorded(install=False) as caught:
        model.is_gradient_checkpointing
    if not caught:
        pytest.skip("this transformers has no deprecated is_gradient_checkpointing alias")
    with recorded() as caught:
        model.is_gradient_checkpointing
        model.gradient_checkpointing_enable()
        model.gradient_checkpointing_disable()
        from trl import GRPOConfig

        GRPOConfig(output_dir="unused", use_cpu=True, report_to="none")
        # The same text from any other module (the user's own code) still shows.
        warnings.warn_explicit("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "my_script.py", 1, module="my_script")
    assert [str(w.message) for w in caught] == ["`gradient_checkpointing` is deprecated and will be removed in v6."]


def test_dataset_and_completion_code_compiles_without_warnings():
    from spark_trl.data import mbpp_problem
    from spark_trl.prompts import extract_code
    from spark_trl.sandbox import Executor, Job

    row = {"task_id": 1, "prompt": "Find the digits.", "code": ESCAPE,
           "test_list": ["assert digits('a1b22') == ['1', '22']", "assert '\\d' != 1"]}
    with recorded(install=False) as caught:  # the control: compiling this source does warn
        compile(ESCAPE, "<my code>", "exec")
    assert [w.category for w in caught] == [SyntaxWarning if sys.version_info >= (3, 12) else DeprecationWarning]
    with recorded() as caught:
        problem = mbpp_problem(row)
        extract_code("Here it is:\n" + ESCAPE + "\nThat's all.")
        with Executor(workers=1) as ex:
            ex.validate([Job(ESCAPE, list(problem.tests))])
        compile(ESCAPE, "<my code>", "exec")  # code of anyone else: still warned about
    assert [w.filename for w in caught] == ["<my code>"]
    assert problem.entry_point == "digits"
