"""What running a program against its tests produced: the structured result behind every reward float.

The sandbox fills these in, the execution reward turns them into a scalar, the trainer logs their shares and
the recycling objective (Condition C) reads them. Only plain data: they cross process boundaries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


# The error type of a test the sandbox did not run: the job's ``stop_after`` rule stopped it at an earlier test
# (``spark_trl.sandbox.Job``). Such a test carries that earlier test's status.
NOT_RUN = "NotRun"


class Status(str, Enum):
    """The class of one test's result, or of a whole attempt (that of its first failing test)."""

    PASSED = "passed"
    WRONG_ANSWER = "wrong_answer"  # ran to completion, an assertion of the test failed
    RUNTIME_ERROR = "runtime_error"  # an exception other than the test's assertion, or the program died
    TIMEOUT = "timeout"  # the harness's own deadline expired
    SYNTAX_ERROR = "syntax_error"  # the program does not compile


@dataclass
class TestResult:
    status: Status
    duration: float = 0.0  # seconds, measured by the harness
    error_type: str | None = None  # e.g. "ZeroDivisionError", as the harness saw it
    error_tail: str = ""  # the last lines of the error message / traceback, capped

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        return d


@dataclass
class ExecutionOutcome:
    """The result of one completion against all tests of its problem."""

    status: Status  # PASSED only if every test passed; else the class of the first failing test
    tests: list[TestResult] = field(default_factory=list)
    duration: float = 0.0
    code: str = ""  # the program that was executed (after extraction)
    error_tail: str = ""  # the first failing test's error tail
    # The program makes no attempt at the problem (a stub: no entry point, or a body that only returns a constant,
    # passes or holds a docstring); set by ExecutionReward, see spark_trl.reward.is_no_attempt.
    no_attempt: bool = False
    runners: int = 0  # sandbox processes started for it: 1, plus one per test after a timeout or a death

    @property
    def passed(self) -> int:
        return sum(t.status is Status.PASSED for t in self.tests)

    @property
    def total(self) -> int:
        return len(self.tests)

    @property
    def not_run(self) -> int:
        """Tests the sandbox skipped after an earlier timeout or failure (``Job.stop_after``); counted in
        ``total``, never in ``passed``."""
        return sum(t.error_type == NOT_RUN for t in self.tests)

    @property
    def all_passed(self) -> bool:
        return self.status is Status.PASSED

    def to_dict(self) -> dict:
        return {"status": self.status.value, "passed": self.passed, "total": self.total, "not_run": self.not_run,
                "duration": self.duration, "code": self.code, "error_tail": self.error_tail,
                "no_attempt": self.no_attempt,
                "tests": [t.to_dict() for t in self.tests]}
