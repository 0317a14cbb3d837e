"""What one looping sample costs under each stopping rule (``Job.stop_after``), through each caller.

A program that loops on every test, against MBPP-style problems of ``--tests`` asserts with a ``--timeout``
deadline per test (default 3 x 2 s): the sandbox alone under ``"never"`` (every test runs: the behaviour before
the rule existed), ``"timeout"`` and ``"failure"``; then ``ExecutionReward`` in its three modes (progress ->
"timeout", binary -> "failure", study -> "never") and the evaluation's ``score_completions`` ("failure").

    .venv/bin/python benchmarks/stop_after_bench.py [--tests 3] [--timeout 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from spark_trl.data import Problem
    from spark_trl.evaluation import score_completions
    from spark_trl.reward import ExecutionReward
    from spark_trl.sandbox import Executor, Job

    loop = "def f(x):\n    while True:\n        pass"
    tests = [f"assert f({i}) == {i}" for i in range(args.tests)]
    fenced = f"```python\n{loop}\n```"

    def timed(run):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        return best

    print(f"one looping sample, {args.tests} tests x {args.timeout:g} s (best of {args.repeats}):")
    with Executor(workers=2, timeout=args.timeout) as ex:
        for rule in ("never", "timeout", "failure"):
            s = timed(lambda: ex.run([Job(loop, tests, stop_after=rule)]))
            print(f"  {f'Executor.run, stop_after={rule!r}':<56} {s:6.2f} s")
        for mode in ("progress", "binary", "study"):
            reward = ExecutionReward(mode=mode, executor=ex)
            reward.uninformative_tests(tests, entry_point="f")  # the stubs' run (once per problem) is not timed
            s = timed(lambda: reward(completions=[fenced], tests=tests, entry_point="f"))
            print(f"  {f'ExecutionReward(mode={mode!r}), stop_after={reward.stop_after!r}':<56} {s:6.2f} s")
        problem = Problem(task_id="loop/1", benchmark="loop", prompt="", entry_point="f", tests=tuple(tests))
        for rule in ("never", "failure"):
            s = timed(lambda: score_completions([problem], [[fenced]], ex, timeout=args.timeout, stop_after=rule))
            print(f"  {f'score_completions, stop_after={rule!r}':<56} {s:6.2f} s")


if __name__ == "__main__":
    main()
