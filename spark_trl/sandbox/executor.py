"""The caller's side: ``Job``, the ``Executor`` pool of judge processes, and the shared executor.

The caller (the trainer; it may hold CUDA) never forks: it starts each judge with ``subprocess`` (fork+exec of a
fresh interpreter) and exchanges pickled jobs and results with it over pipes. A judge that dies or hangs past
its job's budget is killed (its whole session) and replaced; its job counts as a runtime error of the harness.
"""

from __future__ import annotations

import atexit
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from . import isolation, wire, workdir

STOP_AFTER = wire.STOP_AFTER  # the values of ``Job.stop_after``


@dataclass
class Job:
    """One program and the tests it must pass.

    ``code`` is the program, or with ``extract=True`` a model's raw completion from which the judge extracts the
    program (``spark_trl.prompts.extract_code`` with the entry point): in the judge's process, under the job's
    deadline, so that no completion costs the caller's thread anything (the outcome's ``code`` is then the
    extracted program). ``setup`` (imports, helpers) runs before the program in the runner and before each test
    in the judge; ``timeout`` (seconds, per test) defaults to the executor's; ``entry_point`` (optional) names
    the function under test.

    ``stop_after`` says when the judge stops running the job's tests (they run one after another, and a test that
    times out costs the whole ``timeout``):

    * ``"never"`` (the default): every test runs, whatever the earlier ones did;
    * ``"timeout"``: once a test times out, the remaining tests are not run;
    * ``"failure"``: once a test does not pass (wrong answer, runtime error, timeout...), the remaining tests are
      not run.

    A test that was not run gets the status of the test that stopped the job, duration 0, error type ``"NotRun"``
    (``spark_trl.outcome.NOT_RUN``) and a tail naming that test (``"not run: test 1 timed out"``, tests counted
    from 0 as in ``outcome.tests``); the outcome's status and error tail are still the stopping test's. A program
    that does not compile or fails to load fails every test the same way, as with ``"never"``.
    """

    code: str
    tests: Sequence[str]
    setup: str = ""
    timeout: float | None = None
    task_id: str = ""
    entry_point: str = ""
    extract: bool = False
    stop_after: str = "never"


class _JudgeProcess:
    def __init__(self, popen, info):
        self.popen, self.info = popen, info
        self.root = info.get("root")


_WARNED: set[str] = set()
_LAYER_HELP = {
    "userns": "user namespaces unavailable: pid namespace only as root",
    "pidns": "no pid namespace: the runner's session is killed at the deadline instead",
    "mountns": "no private file system view: the runner can stat host files and its work dir's size is checked "
               "only after each test",
    "seccomp": "no seccomp filter: network, fork/exec and signals outside the runner are NOT blocked",
    "landlock": "no Landlock: the runner can read any file the user can (datasets, caches)",
}


class Executor:
    """A pool of pre-started judges running ``Job``s in parallel; results in input order.

    Args:
        workers: judge processes (default: the CPUs this process may use).
        timeout: seconds per test (a ``Job`` may override it).
        memory_mb: address-space limit of each runner.
        disk_mb: total size of a runner's work dir (a tmpfs of that size with namespaces on; else checked after
            each test); a program that fills it fails the test as ``DiskLimitExceeded``.
        namespaces, seccomp, landlock: isolation layers (all on by default; each is probed once and falls back
            with a one-time warning when the machine does not offer it). ``namespaces`` covers the user, pid and
            mount namespaces (the private file system view).

    Example:
    ```python
    >>> with Executor(workers=2, timeout=5) as ex:
    ...     outcomes = ex.run([Job("def add(a, b):\\n    return a + b", ["assert add(1, 2) == 3"])])
    >>> outcomes[0].status
    <Status.PASSED: 'passed'>
    ```
    """

    def __init__(self, workers: int | None = None, timeout: float = 10.0, memory_mb: int = 2048, *,
                 namespaces: bool = True, seccomp: bool = True, landlock: bool = True, tmp_dir: str | None = None,
                 disk_mb: int = 64):
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64, got {memory_mb}")
        if int(disk_mb) < 1:
            raise ValueError(f"disk_mb must be >= 1, got {disk_mb}")
        self.workers, self.timeout, self.memory_mb = int(workers), float(timeout), int(memory_mb)
        self._cfg = {"namespaces": namespaces, "seccomp": seccomp, "landlock": landlock,
                     "tmp_dir": tmp_dir or workdir.default_tmp_dir(), "disk_mb": int(disk_mb),
                     "memory_mb": self.memory_mb}
        workdir.remove_stale_roots(self._cfg["tmp_dir"])
        self._judges: list[_JudgeProcess | None] = [None] * self.workers
        self._lock = threading.Lock()
        self._closed = False
        self.layers: dict = {}
        self.probe: dict = {}
        threads = [threading.Thread(target=self._ensure, args=(i,)) for i in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(j is None for j in self._judges):
            self.close()
            raise RuntimeError("the sandbox's judge processes failed to start (see stderr)")

    # ---------------------------------------------------------------- judges
    def _start_judge(self) -> _JudgeProcess:
        import subprocess

        # The judge imports this package without spark_trl/__init__.py (which imports torch and TRL): a bare
        # `spark_trl` package module pointing at our directory.
        package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        boot = ("import sys, types\n"
                "package = types.ModuleType('spark_trl')\n"
                f"package.__path__ = [{package_dir!r}]\n"
                "sys.modules['spark_trl'] = package\n"
                "from spark_trl.sandbox import judge\n"
                "judge.main()\n")
        # -W: a model's program with `"\d"` or `x is 1` would print a SyntaxWarning on the user's terminal from
        # every judge that compiles it; the verdict does not depend on it.
        popen = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-W", "ignore::SyntaxWarning", "-c", boot],
                                 stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=isolation.scrubbed_env(), start_new_session=True,
                                 close_fds=True, cwd="/")
        try:
            wire.write_message(popen.stdin.fileno(), self._cfg)
            info = wire.read_message(popen.stdout.fileno(), time.monotonic() + 120)
        except (OSError, EOFError, wire.Closed, wire.DeadlineExpired):
            info = None
        if not isinstance(info, dict) or not info.get("ready"):
            _kill_judge(popen, None)
            raise RuntimeError("a judge failed to start")
        return _JudgeProcess(popen, info)

    def _ensure(self, i: int) -> _JudgeProcess | None:
        j = self._judges[i]
        if j is not None and j.popen.poll() is None:
            return j
        try:
            j = self._start_judge()
        except (RuntimeError, OSError) as exc:
            print(f"spark_trl.sandbox: judge start failed: {exc}", file=sys.stderr)
            return None
        self._judges[i] = j
        with self._lock:
            if not self.layers:
                self.layers, self.probe = j.info["layers"], j.info["probe"]
                for layer, on in self.layers.items():
                    wanted = self._cfg["namespaces"] if layer.endswith("ns") else self._cfg.get(layer)
                    if wanted and not on and layer not in _WARNED:
                        _WARNED.add(layer)
                        import warnings

                        warnings.warn(f"spark_trl.sandbox: {_LAYER_HELP[layer]} ({j.info['probe'].get(layer)})",
                                      RuntimeWarning, stacklevel=3)
        return j

    # ---------------------------------------------------------------- running
    def validate(self, jobs: Sequence[Job]) -> None:
        """Raise ValueError naming the task for dataset faults (no tests, a test or setup that does not
        compile) and bad settings (timeout, stop_after), before any work starts."""
        for k, job in enumerate(jobs):
            name = job.task_id or f"job {k}"
            if not isinstance(job, Job):
                raise TypeError(f"jobs[{k}] is a {type(job).__name__}, expected a Job")
            tests = job.tests
            if isinstance(tests, str) or not tests or not all(isinstance(t, str) for t in tests):
                raise ValueError(f"{name}: tests must be a non-empty list of strings, got {tests!r:.80}")
            for i, test in enumerate(tests):
                _check_compiles(test, f"{name}: test {i}")
            if not isinstance(job.setup, str):
                raise ValueError(f"{name}: setup must be a string, got {type(job.setup).__name__}")
            _check_compiles(job.setup, f"{name}: test setup")
            if job.timeout is not None and not job.timeout > 0:
                raise ValueError(f"{name}: timeout must be > 0 seconds, got {job.timeout}")
            if not isinstance(job.stop_after, str) or job.stop_after not in STOP_AFTER:
                raise ValueError(f"{name}: stop_after must be one of {', '.join(STOP_AFTER)}; "
                                 f"got {job.stop_after!r:.80}")

    def run(self, jobs: Sequence[Job], progress: bool = False) -> list:
        """Run ``jobs`` in parallel on the judges; one ``ExecutionOutcome`` per job, in the same order."""
        from ..outcome import ExecutionOutcome, Status, TestResult

        if self._closed:
            raise RuntimeError("this Executor is closed")
        jobs = list(jobs)
        self.validate(jobs)
        results: list = [None] * len(jobs)
        todo: queue.Queue = queue.Queue()
        for k in range(len(jobs)):
            todo.put(k)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="executing", leave=False, dynamic_ncols=True)

        def work(i: int):
            while True:
                try:
                    k = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    results[k] = self._run_one(i, jobs[k])
                except BaseException as exc:  # noqa: BLE001 - one job never fails the batch
                    results[k] = _harness_error(jobs[k], f"{type(exc).__name__}: {exc}")
                    self._replace(i)
                if bar is not None:
                    bar.update(1)

        threads = [threading.Thread(target=work, args=(i,), daemon=True)
                   for i in range(min(self.workers, len(jobs)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if bar is not None:
            bar.close()
        outcomes = []
        for job, res in zip(jobs, results):
            tests = [TestResult(Status(s), float(d), e, t) for s, d, e, t in res["tests"]]
            first = next((t for t in tests if t.status is not Status.PASSED), None)
            code = res.get("code", job.code)
            outcomes.append(ExecutionOutcome(status=Status.PASSED if first is None else first.status, tests=tests,
                                             duration=float(res["duration"]),
                                             code=code if isinstance(code, str) else "",
                                             error_tail=first.error_tail if first else "",
                                             runners=int(res.get("runners", 0))))
        return outcomes

    def _run_one(self, i: int, job: Job) -> dict:
        timeout = float(job.timeout or self.timeout)
        # A non-str code is not a program: "\x00" compiles to a syntax error in the judge.
        msg = {"code": job.code if isinstance(job.code, str) else "\x00", "tests": list(job.tests), "setup": job.setup,
               "timeout": timeout, "memory_mb": self.memory_mb, "entry_point": job.entry_point or "",
               "extract": bool(job.extract), "stop_after": job.stop_after}
        budget = (len(msg["tests"]) + 1) * (timeout + 1.0) + 30.0
        j = self._ensure(i)
        if j is not None:
            try:
                wire.write_message(j.popen.stdin.fileno(), msg)
                res = wire.read_message(j.popen.stdout.fileno(), time.monotonic() + budget)
                if isinstance(res, dict):
                    if res.get("retire"):  # its work dir could not be emptied: a fresh judge takes over
                        self._replace(i)
                    return res
            except (Exception, wire.DeadlineExpired):  # EOF, a broken pipe, a deadline, an unreadable reply
                pass
            # The judge died or hung: replace it; the job counts as a runtime error of the harness.
            self._replace(i)
        return _harness_error(job, "the judge process died or hung")

    def _replace(self, i: int) -> None:
        j, self._judges[i] = self._judges[i], None
        if j is not None:
            _kill_judge(j.popen, j.root)

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Stop the judges and remove their work dirs. Never raises."""
        self._closed = True
        for i, j in enumerate(self._judges):
            if j is not None:
                try:
                    j.popen.stdin.close()
                    j.popen.wait(timeout=5)
                except Exception:  # noqa: BLE001
                    pass
                self._replace(i)

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _check_compiles(source: str, where: str) -> None:
    try:
        compile(source, "<test>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"{where} does not compile (a dataset error, not the program's): {exc}") from None


def _harness_error(job: Job, why: str) -> dict:
    n = len(job.tests)
    return {"tests": [("runtime_error", 0.0, "HarnessError", why)] * n, "duration": 0.0}


def _kill_judge(popen, root: str | None) -> None:
    """Kill a judge's session (the judge and its zygote) and remove its work dir. Never raises."""
    if popen.poll() is None:
        try:
            os.killpg(popen.pid, signal.SIGKILL)  # its own session: the judge and its zygote
        except (ProcessLookupError, PermissionError):
            pass
        popen.kill()
    try:
        popen.wait(timeout=10)
    except Exception:  # noqa: BLE001
        pass
    for f in (popen.stdin, popen.stdout):
        try:
            if f is not None:
                f.close()
        except OSError:
            pass
    if root:
        workdir.remove_tree(root)


_shared: Executor | None = None
_shared_lock = threading.Lock()


def get_executor(**kwargs) -> Executor:
    """The process-wide shared ``Executor``, created on first use (closed at exit)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared._closed:
            _shared = Executor(**kwargs)
            atexit.register(_shared.close)
        return _shared
