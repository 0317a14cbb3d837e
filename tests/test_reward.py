"""ExecutionReward on real data: every MBPP reference and HumanEval canonical solution scores 1.0, broken
versions score the study's exact values with the right class, the progress and binary modes pay nothing for
doing nothing, no-attempt detection, and TRL's calling convention works."""

from __future__ import annotations

import pytest

from spark_trl import outcome as oc
from spark_trl.outcome import ExecutionOutcome, Status
from spark_trl.reward import ExecutionReward
from spark_trl.sandbox import Executor


@pytest.fixture(scope="module")
def ex():
    with Executor(workers=2, timeout=10.0) as executor:
        yield executor


@pytest.fixture(scope="module")
def reward(ex):
    return ExecutionReward(mode="study", executor=ex)


@pytest.fixture(scope="module")
def progress(ex):
    return ExecutionReward(executor=ex)  # the default mode


def _outcome(*statuses: Status) -> ExecutionOutcome:
    tests = [oc.TestResult(s) for s in statuses]
    first = next((s for s in statuses if s is not Status.PASSED), Status.PASSED)
    return ExecutionOutcome(status=first, tests=tests)


P, W, R, T, S = Status.PASSED, Status.WRONG_ANSWER, Status.RUNTIME_ERROR, Status.TIMEOUT, Status.SYNTAX_ERROR


@pytest.mark.parametrize("statuses, expected", [
    ((P, P, P), 1.0),
    ((S, S, S), -0.2),
    ((W, W, W), 0.0),
    ((P, P, W), 2 / 3),
    ((P, W, R), 1 / 3),  # the first failing test decides the class: wrong answer
    ((P, P, R), 2 / 3 - 0.1),
    ((R, P, P), 2 / 3 - 0.1),
    ((R, R, R), -0.1),
    ((P, T, W), 1 / 3 - 0.3),
    ((T, T, T), -0.3),
    ((P, P, P, T), 0.75 - 0.3),
])
def test_study_scoring_rule(statuses, expected):
    assert ExecutionReward(mode="study").score(_outcome(*statuses)) == pytest.approx(expected)


def test_scoring_constants_are_arguments():
    r = ExecutionReward(mode="study", syntax_penalty=-1, runtime_penalty=-0.5, timeout_penalty=-0.7,
                        wrong_answer_floor=0.1)
    assert r.score(_outcome(S)) == -1
    assert r.score(_outcome(P, R)) == pytest.approx(0.0)
    assert r.score(_outcome(R, R)) == -0.5
    assert r.score(_outcome(T)) == -0.7
    assert r.score(_outcome(W, W)) == 0.1


def _fenced(code: str) -> str:
    # As a model writes it. Unfenced text goes through extract_code's prose stripping, which drops top-level
    # statements before the first def (MBPP 18's NO_OF_CHARS) and trailing lines that do not compile.
    return f"```python\n{code}\n```"


def _rows(problems):
    return dict(tests=[list(p.tests) for p in problems], test_setup=[p.test_setup for p in problems],
                entry_point=[p.entry_point for p in problems], task_id=[p.task_id for p in problems])


def test_all_mbpp_references_score_one(reward, mbpp_problems):
    assert len(mbpp_problems) == 427
    scores = reward(completions=[_fenced(p.reference) for p in mbpp_problems], **_rows(mbpp_problems))
    failed = [(p.task_id, o.status.value, o.error_tail[-200:])
              for p, s, o in zip(mbpp_problems, scores, reward.last_outcomes) if s != 1.0]
    assert not failed


def test_all_humaneval_canonical_solutions_score_one(reward, humaneval_problems):
    assert len(humaneval_problems) == 164
    completions = [[{"role": "assistant", "content": f"```python\n{p.reference}\n```"}] for p in humaneval_problems]
    scores = reward(completions=completions, **_rows(humaneval_problems))
    failed = [(p.task_id, o.error_tail[-200:]) for p, s, o in zip(humaneval_problems, scores, reward.last_outcomes)
              if s != 1.0]
    assert not failed
    # Split checks give per-assert partial credit: most HumanEval problems have several tests.
    assert sum(len(p.tests) > 1 for p in humaneval_problems) > 100


def test_broken_mbpp_programs_get_the_right_class_and_value(reward, mbpp_problems):
    problems = mbpp_problems
    raising = [f"{p.reference}\n\ndef {p.entry_point}(*args, **kwargs):\n    raise ValueError('broken')\n"
               for p in problems]
    syntax = [f"{p.reference}\n\ndef {p.entry_point}(*args, **kwargs)\n    return 0\n" for p in problems]
    scores = reward(completions=[_fenced(c) for c in raising + syntax], **{k: v * 2 for k, v in _rows(problems).items()})
    outcomes = reward.last_outcomes
    n = len(problems)
    assert all(o.status is Status.RUNTIME_ERROR and o.tests[0].error_type == "ValueError" for o in outcomes[:n])
    assert scores[:n] == [-0.1] * n
    assert all(o.status is Status.SYNTAX_ERROR for o in outcomes[n:]) and scores[n:] == [-0.2] * n


def test_wrong_answers_and_partial_credit(reward, mbpp_problems):
    # A wrong constant: every test fails its assertion (or, for tests that compute with the result, raises).
    problems = [p for p in mbpp_problems if p.number in (2, 3, 4, 17, 18, 20)]
    wrong = [f"{p.reference}\n\ndef {p.entry_point}(*args, **kwargs):\n    return '__wrong__'\n" for p in problems]
    scores = reward(completions=[_fenced(c) for c in wrong], **_rows(problems))
    assert all(o.status in (Status.WRONG_ANSWER, Status.RUNTIME_ERROR) for o in reward.last_outcomes)
    assert all(s <= 0.0 for s in scores)
    # Right on the first test only (MBPP 17: square_perimeter(10) == 40): exactly base = 1/3.
    (p17,) = [p for p in mbpp_problems if p.number == 17]
    code = "def square_perimeter(a):\n    return 40 if a == 10 else 0"
    assert reward(completions=[code], **_rows([p17])) == [pytest.approx(1 / 3)]
    assert [t.status for t in reward.last_outcomes[0].tests] == [P, W, W]
    # ... then raising on the others: max(1/3 - 0.1, -0.1).
    code = "def square_perimeter(a):\n    if a == 10:\n        return 40\n    raise KeyError(a)"
    assert reward(completions=[code], **_rows([p17])) == [pytest.approx(1 / 3 - 0.1)]


def test_infinite_loops_time_out_with_the_study_value(ex, mbpp_problems):
    problems = mbpp_problems[:3]
    fast = ExecutionReward(mode="study", executor=ex, timeout=0.5)
    loops = [f"{p.reference}\n\ndef {p.entry_point}(*args, **kwargs):\n    while True:\n        pass\n"
             for p in problems]
    assert fast(completions=[_fenced(c) for c in loops], **_rows(problems)) == [-0.3] * 3
    assert all(o.status is Status.TIMEOUT for o in fast.last_outcomes)


def test_a_shared_executor_sets_the_per_test_timeout_unless_one_is_given(mbpp_problems):
    """ExecutionReward(executor=ex) runs each test under ex's timeout: with the study's 10 s instead, one endless
    loop held a step for 30 s (3 tests) in the learning benchmark."""
    import time

    p = mbpp_problems[0]
    loop = _fenced(f"def {p.entry_point}(*args, **kwargs):\n    while True:\n        pass\n")
    with Executor(workers=2, timeout=0.5) as short:
        inherited = ExecutionReward(executor=short)
        assert inherited.timeout == 0.5
        t0 = time.perf_counter()
        assert inherited(completions=[loop], **_rows([p])) == [0.0]
        assert inherited.last_outcomes[0].status is Status.TIMEOUT
        assert time.perf_counter() - t0 < 0.5 * len(p.tests) + 3.0  # not 10 s per test
        assert ExecutionReward(executor=short, timeout=3.0).timeout == 3.0  # an explicit value still wins
    assert ExecutionReward().timeout == 10.0  # no executor: the study's limit


def test_humaneval_partial_credit_from_split_checks(reward, humaneval_problems):
    p = humaneval_problems[0]  # has_close_elements, 7 asserts
    code = "def has_close_elements(numbers, threshold):\n    return True"
    (score,) = reward(completions=[code], **_rows([p]))
    outcome = reward.last_outcomes[0]
    assert outcome.total == len(p.tests) > 1 and 0 < outcome.passed < outcome.total
    assert score == pytest.approx(outcome.passed / outcome.total) and outcome.status is Status.WRONG_ANSWER


def test_trl_calling_convention_and_logging(reward, mbpp_problems):
    from spark_trl.data import to_grpo_dataset

    ds = to_grpo_dataset(mbpp_problems[:2])
    rows = [ds[0], ds[0], ds[1], ds[1]]
    completions = [[{"role": "assistant", "content": f"```python\n{mbpp_problems[0].reference}\n```"}],
                   [{"role": "assistant", "content": "I cannot do that."}],
                   [{"role": "assistant", "content": _fenced(mbpp_problems[1].reference)}],
                   [{"role": "assistant", "content": "def f(:"}]]
    # What GRPOTrainer._calculate_rewards passes: every column but prompt/completion, plus trainer extras.
    kwargs = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt",)}
    metrics, extra = {}, {}
    scores = reward(prompts=[r["prompt"] for r in rows], completions=completions, completion_ids=[[1]] * 4,
                    trainer_state=None, log_metric=lambda k, v: metrics.setdefault(k, v),
                    log_extra=lambda k, v: extra.setdefault(k, v), **kwargs)
    assert scores[0] == 1.0 and scores[2] == 1.0 and scores[1] < 1.0 and scores[3] == -0.2
    assert reward.__name__ == "execution_reward"
    assert [o.status for o in reward.last_outcomes][::2] == [P, P]
    assert metrics["execution/passed"] == 0.5 and metrics["execution/syntax_error"] >= 0.25
    assert "execution/tests_passed" in metrics and "execution/test_timeouts" in metrics
    assert extra["execution_status"][0] == "passed" and len(extra["execution_status"]) == 4
    outcomes = reward.run([mbpp_problems[0].reference], [list(mbpp_problems[0].tests)],
                          [mbpp_problems[0].test_setup])
    assert outcomes[0].all_passed and not isinstance(outcomes[0], float)


# ------------------------------------------------------------------------------------ progress / binary modes

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0", "assert add(5, 0) == 5"]


@pytest.mark.parametrize("statuses, expected", [
    ((P, P, P), 1.0), ((S, S, S), 0.0), ((W, W, W), 0.0), ((P, P, W), 2 / 3), ((P, W, R), 1 / 3),
    ((P, P, R), 2 / 3), ((R, R, R), 0.0), ((P, T, W), 1 / 3), ((T, T, T), 0.0),
])
def test_progress_rule_without_stub_information_never_goes_below_zero(statuses, expected):
    assert ExecutionReward().score(_outcome(*statuses)) == pytest.approx(expected)


@pytest.mark.parametrize("statuses", [(P, P, P), (S, S), (W, P), (R, P, P), (T, T), (P, P, T)])
def test_binary_rule(statuses):
    expected = 1.0 if all(s is P for s in statuses) else 0.0
    assert ExecutionReward(mode="binary").score(_outcome(*statuses)) == expected


def test_progress_credits_only_tests_that_no_stub_passes(progress):
    # add(0, 0) == 0 is passed by `return 0`, add(5, 0) == 5 by `return args[0]`: only the first two count.
    assert progress.uninformative_tests(ADD_TESTS, entry_point="add") == (False, False, True, True)
    programs = {
        "def add(a, b):\n    return a + b": 1.0,  # all pass
        "def add(a, b):\n    return a * b": 1 / 4,  # passes add(2, 2) (earned) and add(0, 0) (not earned)
        "def add(a, b):\n    return a": 0.0,  # passes add(0, 0) and add(5, 0): both uninformative
        'def add(a, b):\n    """Add two numbers."""': 0.0,  # the docstring-only stub
        "def add(a, b):\n    pass": 0.0,
        "def add(a, b):\n    return 0": 0.0,
        "def add(a, b):\n    return a +": 0.0,  # a syntax error: no penalty below the stub
        "def add(a, b):\n    if a == 1:\n        return 3\n    raise ValueError": 1 / 4,  # partial, then raises
        "def add(a, b):\n    if a == 1:\n        return 3\n    while True:\n        pass": 1 / 4,  # then times out
    }
    fast = ExecutionReward(executor=progress.executor, timeout=1.0)
    scores = fast(completions=[_fenced(c) for c in programs], tests=ADD_TESTS, entry_point="add")
    assert scores == [pytest.approx(v) for v in programs.values()]
    assert min(scores) >= 0.0  # trying is never worse than doing nothing


def test_truncated_completion_scores_like_a_stub_in_progress_mode_and_below_it_in_the_study(ex, progress):
    # Cut by the token limit inside the function body: an unterminated fence and a half statement.
    truncated = "```python\ndef add(a, b):\n    result = a + (b"
    stub = "```python\ndef add(a, b):\n    \"\"\"Add.\"\"\"\n```"
    study = ExecutionReward(mode="study", executor=ex)
    assert progress(completions=[truncated, stub], tests=ADD_TESTS, entry_point="add") == [0.0, 0.0]
    assert [o.no_attempt for o in progress.last_outcomes] == [False, True]
    assert study(completions=[truncated, stub], tests=ADD_TESTS, entry_point="add") == [-0.2, 0.0]  # the trap


def test_progress_mode_stubs_without_an_entry_point_column(progress):
    # Plain TRL datasets may have no entry_point: the stubs define every function the tests call.
    tests = ["assert is_odd(3) == True", "assert is_odd(4) == False", "assert is_odd(7) == True"]
    assert progress.uninformative_tests(tests) == (True, True, True)  # `return True` / `return False` pass them
    good = "def is_odd(n):\n    return n % 2 == 1"
    half = "def is_odd(n):\n    return n == 3"
    assert progress(completions=[good, half], tests=tests) == [1.0, 0.0]
    # Names the setup defines or builtins are not stubbed.
    assert progress.uninformative_tests(["assert helper(sorted([2, 1])) == [1, 2]"],
                                        "def helper(x):\n    return x") == (False,)


def test_progress_mode_on_mbpp_references_and_uninformative_share(progress, mbpp_problems):
    problems = mbpp_problems[:40]
    scores = progress(completions=[_fenced(p.reference) for p in problems], **_rows(problems))
    assert scores == [1.0] * len(problems)
    flags = [progress.uninformative_tests(p.tests, p.test_setup, p.entry_point) for p in problems]
    # Some MBPP tests are passed by a constant (`== False`, `== 0`), most are not.
    share = sum(map(sum, flags)) / sum(map(len, flags))
    assert 0.0 < share < 0.5


def test_progress_mode_caches_stub_results_per_problem(ex):
    reward = ExecutionReward(executor=ex)
    reward(completions=["def add(a, b):\n    return a"] * 3, tests=ADD_TESTS, entry_point="add")
    assert len(reward._uninformative) == 1
    reward(completions=["def add(a, b):\n    return b"], tests=ADD_TESTS, entry_point="add")
    assert len(reward._uninformative) == 1


def test_mode_and_penalties_are_checked():
    with pytest.raises(ValueError, match="mode must be one of"):
        ExecutionReward(mode="lenient")
    with pytest.raises(ValueError, match="takes no penalties"):
        ExecutionReward(mode="progress", syntax_penalty=-0.5)
    assert ExecutionReward(mode="study").syntax_penalty == -0.2
    assert ExecutionReward(mode="binary", syntax_penalty=0.0).mode == "binary"  # zero is no penalty


# ------------------------------------------------------------------------------------ stopping rules

# Crafted programs for ADD_TESTS: each mode's early stop must score them as running every test would.
CRAFTED = [
    "def add(a, b):\n    return a + b",  # all pass
    "def add(a, b):\n    return a * b",  # wrong on 0, passes 1 and 2 (credit in progress)
    "def add(a, b):\n    return a + b + 1 if a == 5 else a + b",  # wrong on the last test only
    "def add(a, b):\n    if a == 1:\n        return 3\n    raise ValueError",  # passes 0, raises after
    "def add(a, b):\n    return b",  # uninformative passes only
    "def add(a, b):\n    return a +",  # syntax error
    'def add(a, b):\n    """Add."""',  # stub
    "def add(a, b):\n    raise KeyError(a) if a == 1 else None",  # raises on 0, None after
]
LOOPING = [
    "def add(a, b):\n    while True:\n        pass",  # loops on every test
    "def add(a, b):\n    if a == 1:\n        return 3\n    while True:\n        pass",  # passes 0, loops after
    "def add(a, b):\n    while a == 2:\n        pass\n    return 0",  # wrong, loops, then passes 2 (stubs do)
]


def _scores(reward, programs):
    return reward(completions=[_fenced(c) for c in programs], tests=ADD_TESTS, entry_point="add")


def test_each_mode_has_its_stopping_rule(ex):
    assert ExecutionReward(executor=ex).stop_after == "timeout"
    assert ExecutionReward(mode="binary", executor=ex).stop_after == "failure"
    assert ExecutionReward(mode="study", executor=ex).stop_after == "never"
    assert ExecutionReward(mode="progress", stop_after="never", executor=ex).stop_after == "never"
    with pytest.raises(ValueError, match="stop_after must be one of never, timeout, failure"):
        ExecutionReward(stop_after="first")


def test_binary_scores_are_exact_under_its_stop_at_the_first_failure(ex):
    binary = ExecutionReward(mode="binary", executor=ex, timeout=0.5)
    every = ExecutionReward(mode="binary", executor=ex, timeout=0.5, stop_after="never")
    programs = CRAFTED + LOOPING
    fast = _scores(binary, programs)
    fast_outcomes = binary.last_outcomes
    assert fast == _scores(every, programs) == [1.0] + [0.0] * (len(programs) - 1)
    # Same verdicts (status, first failure's tail), fewer tests run.
    assert [(o.status, o.error_tail) for o in fast_outcomes] == [(o.status, o.error_tail) for o in every.last_outcomes]
    assert fast_outcomes[1].not_run == 3 and fast_outcomes[1].status is W  # wrong on test 0: nothing else ran
    assert fast_outcomes[len(CRAFTED)].not_run == 3 and fast_outcomes[len(CRAFTED)].runners == 1
    assert all(o.not_run == 0 for o in every.last_outcomes)


def test_progress_scores_are_exact_when_nothing_times_out(ex):
    progress = ExecutionReward(executor=ex, timeout=1.0)
    every = ExecutionReward(executor=ex, timeout=1.0, stop_after="never")
    assert _scores(progress, CRAFTED) == _scores(every, CRAFTED)
    assert all(o.not_run == 0 for o in progress.last_outcomes)  # wrong answers and errors never stop it
    assert _scores(progress, CRAFTED)[1] == pytest.approx(1 / 4)  # partial credit after a wrong answer kept


def test_progress_scores_a_timeout_as_timing_out_on_the_remaining_tests(ex):
    """The documented approximation: after a timeout the remaining tests earn nothing. Here that changes only
    the third program, which loops on test 1 and would pass test 2 (uninformative: no credit either way) -- and
    a program that loops on one test and then passes informative ones is the case that loses credit."""
    progress = ExecutionReward(executor=ex, timeout=0.5)
    every = ExecutionReward(executor=ex, timeout=0.5, stop_after="never")
    assert _scores(progress, LOOPING) == _scores(every, LOOPING) == [0.0, 0.25, 0.0]
    assert [o.not_run for o in progress.last_outcomes] == [3, 2, 2]
    lossy = "def add(a, b):\n    while a == 1:\n        pass\n    return a + b"  # loops on test 0 only
    assert _scores(every, [lossy]) == [pytest.approx(1 / 4)]  # add(2, 2) earned; the other two uninformative
    assert _scores(progress, [lossy]) == [0.0]


def test_study_runs_every_test_whatever_happens(ex):
    """The study's rule counts the tests passed after a timeout (base - 0.3): every test still runs."""
    study = ExecutionReward(mode="study", executor=ex, timeout=0.5)
    lossy = "def add(a, b):\n    while a == 1:\n        pass\n    return a + b"  # loops on test 0 only
    scores = _scores(study, LOOPING + [lossy])
    assert all(o.not_run == 0 for o in study.last_outcomes)
    assert [o.passed for o in study.last_outcomes] == [0, 1, 1, 3]
    # (The third one's first failure is a wrong answer: max(base, 0).)
    assert scores == [-0.3, pytest.approx(0.25 - 0.3), pytest.approx(0.25), pytest.approx(0.75 - 0.3)]


def test_a_looping_completion_costs_one_timeout_in_progress_and_binary_modes(ex):
    import time

    loop = _fenced("def add(a, b):\n    while True:\n        pass")
    walls = {}
    for mode, rule in (("progress", None), ("binary", None), ("study", None), ("progress", "never")):
        reward = ExecutionReward(mode=mode, executor=ex, timeout=0.5, stop_after=rule)
        reward.uninformative_tests(ADD_TESTS, entry_point="add")  # the stubs' run is not what is timed
        t0 = time.perf_counter()
        metrics = {}
        assert reward(completions=[loop], tests=ADD_TESTS, entry_point="add",
                      log_metric=lambda k, v: metrics.setdefault(k, v)) == [-0.3 if mode == "study" else 0.0]
        walls[mode, rule] = time.perf_counter() - t0
        # Skipped tests carry the timeout's status: a looping completion counts 4 timed-out tests either way.
        assert metrics["execution/test_timeouts"] == 4
        assert metrics["execution/tests_not_run"] == (0 if mode == "study" or rule == "never" else 3)
    assert walls["study", None] >= 4 * 0.5 and walls["progress", "never"] >= 4 * 0.5
    assert walls["progress", None] < 4 * 0.5 and walls["binary", None] < 4 * 0.5


# ------------------------------------------------------------------------------------ no attempt

@pytest.mark.parametrize("code, entry, expected", [
    ('def f(x):\n    """Do it."""', "f", True),
    ("def f(x):\n    pass", "f", True),
    ("def f(x):\n    ...", "f", True),
    ('def f(x):\n    """Doc."""\n    return None', "f", True),
    ("def f(x):\n    return []", "f", True),
    ("def f(x):\n    raise NotImplementedError('todo')", "f", True),
    ("", "f", True),
    ("import math", "f", True),  # never defines f
    ("I am sorry, I cannot write this function.", "f", True),  # prose, never names f
    ("def g(x):\n    return x + 1", "f", True),  # another function
    ("def f(x):\n    return x + 1", "f", False),
    ("def f(x):\n    return x", "f", False),  # identity: a (weak) attempt
    ("def f(x):\n    return x +", "f", False),  # truncated: a failed attempt
    ("def f(x):\n    return x + 1\n\ndef f(x):\n    pass", "f", True),  # the last definition is the one tested
    ("def f(x):\n    pass\n\ndef f(x):\n    return x * 2", "f", False),
    ("f = lambda x: x * 2", "f", False),
    ("def f(x):\n    pass\n\ndef g():\n    f = 3\n    return f", "f", True),  # a local `f` is not the entry point
    ("if True:\n    def f(x):\n        return x * 2", "f", False),  # defined under a module-level statement
    ("class f:\n    pass", "f", False),
    ("from math import factorial as f", "f", False),
    ('def f(x):\n    """Doc."""', None, True),
    ("def f(x):\n    return x * 2", None, False),
    ("x = 1", None, False),
])
def test_is_no_attempt(code, entry, expected):
    from spark_trl.reward import is_no_attempt

    assert is_no_attempt(code, entry) is expected


def test_is_no_attempt_is_bounded_on_hostile_text():
    from spark_trl.reward import is_no_attempt

    assert is_no_attempt("x = " + "1-" * 200_000 + "1", "f") is False  # too long: not analysed
    assert is_no_attempt("x = " + "(" * 5000 + ")" * 5000, "f") in (True, False)  # no exception escapes
    assert is_no_attempt("def f(x):\n    return " + "-" * 20_000 + "x", "f") is False


def test_no_attempt_is_logged(progress):
    metrics = {}
    progress(completions=['def add(a, b):\n    """Add."""', "def add(a, b):\n    return a + b"], tests=ADD_TESTS,
             entry_point="add", log_metric=lambda k, v: metrics.setdefault(k, v))
    assert metrics["execution/no_attempt"] == 0.5
    assert [o.no_attempt for o in progress.last_outcomes] == [True, False]
    assert progress.last_outcomes[0].to_dict()["no_attempt"] is True
