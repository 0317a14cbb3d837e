"""spark_code_eval: evaluate's ``code_eval`` (pass@k of generated code), with every candidate run in spark-trl's
sandbox instead of the caller's process. Load it from the installed package, no hub needed:

    import evaluate, spark_trl
    code_eval = evaluate.load(spark_trl.code_eval_path())

The computation is ``spark_trl.code_eval.compute_code_eval``; this file only declares the metric to ``evaluate``.
"""

import datasets
import evaluate

from spark_trl.code_eval import compute_code_eval

_CITATION = """\
@misc{chen2021evaluating,
      title={Evaluating Large Language Models Trained on Code},
      author={Mark Chen and Jerry Tworek and Heewoo Jun and Qiming Yuan and others},
      year={2021},
      eprint={2107.03374},
      archivePrefix={arXiv},
      primaryClass={cs.LG}
}
"""

_DESCRIPTION = """\
pass@k of generated code (Chen et al., 2021, the unbiased estimator), with the interface of Hugging Face's
code_eval. Each candidate program runs in spark-trl's sandbox (namespaces, seccomp, Landlock, resource limits) and
passes when its reference test program runs to the end; no HF_ALLOW_CODE_EVAL opt-in is needed.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: a list of candidate lists, one per problem: each candidate is a Python program (a string).
    references: one test program per problem (asserts, or a check function and its call), run against each
        of that problem's candidates.
    k: the k of pass@k (default [1, 10, 100]); a k larger than some problem's number of candidates is left out.
    num_workers: sandbox processes running candidates in parallel (default 4).
    timeout: seconds per test (default 3.0); a reference of several top-level asserts is one test per assert.
Returns:
    pass_at_k: {"pass@k": score} for each k.
    results: {problem index: [(completion_id, {"task_id", "completion_id", "passed", "result", "status",
        "tests_passed", "tests_total", "tests_not_run"}), ...]}; "result" is "passed", "timed out" or
        "failed: <error>"; a candidate's tests stop at its first failure (tests_not_run counts those after it).
Examples:
    >>> code_eval = evaluate.load(spark_trl.code_eval_path())
    >>> pass_at_k, results = code_eval.compute(references=["assert add(2, 3) == 5"],
    ...     predictions=[["def add(a, b): return a * b", "def add(a, b): return a + b"]], k=[1, 2])
    >>> {name: float(value) for name, value in pass_at_k.items()}
    {'pass@1': 0.5, 'pass@2': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SparkCodeEval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("string")),
                "references": datasets.Value("string"),
            }),
            homepage="https://github.com/spark-trl/spark-trl",
            codebase_urls=["https://github.com/spark-trl/spark-trl"],
            reference_urls=["https://arxiv.org/abs/2107.03374"],
            license="Apache-2.0",
        )

    def _compute(self, predictions, references, k=[1, 10, 100], num_workers=4, timeout=3.0):
        return compute_code_eval(predictions, references, k=k, num_workers=num_workers, timeout=timeout)
