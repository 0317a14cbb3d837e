"""The sandbox executor: wire format, per-test classes and deadlines, isolation facts seen from inside the
runner, robustness of the pool (a judge that dies is replaced), and nothing left behind."""

from __future__ import annotations

import os
import time

import pytest

from spark_trl.outcome import Status
from spark_trl.sandbox import Executor, Job, WireError, decode, encode


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def assert_clean(ex: Executor, settle: float = 3.0) -> None:
    """Every judge has only its zygote processes below it and an empty work dir: no runner survives."""
    expected = 2 if ex.layers.get("pidns") else 1  # (namespace parent +) zygote
    end = time.monotonic() + settle
    while True:
        extra = {j.popen.pid: _descendants(j.popen.pid) for j in ex._judges if j is not None}
        leftovers = {j.root: os.listdir(os.path.join(j.root, "work")) for j in ex._judges
                     if j is not None and os.path.isdir(os.path.join(j.root, "work"))}
        if all(len(v) == expected for v in extra.values()) and not any(leftovers.values()):
            return
        if time.monotonic() > end:
            raise AssertionError(f"left behind: processes {extra}, files {leftovers}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ex():
    with Executor(workers=2, timeout=3.0) as executor:
        yield executor


# ------------------------------------------------------------------------------------------ wire format


def test_wire_roundtrip_plain_data():
    import collections
    from decimal import Decimal
    from fractions import Fraction

    value = [None, True, False, 0, -1, 2**200, -(2**70), 1.5, float("inf"), 3 - 4j, "héllo\udcff", b"\x00\xff",
             bytearray(b"ab"), (1, (2,)), {"a": [1, {2, 3}], 4: frozenset({5})}, Ellipsis, range(1, 9, 2),
             Decimal("1.10"), Fraction(3, 4), collections.OrderedDict(a=1), collections.Counter("aab"),
             collections.deque([1, 2]), int, str]
    decoded = decode(encode(value, lambda o: pytest.fail(f"not plain: {o!r}")), lambda h: pytest.fail("handle"))
    assert decoded == value
    assert [type(x) for x in decoded] == [type(x) for x in value]


def test_wire_subclasses_and_objects_become_handles():
    class S(str):
        def __eq__(self, other):
            return True

    class L(list):
        pass

    seen = []
    data = encode([S("x"), L([1]), object()], lambda o: seen.append(o) or len(seen))
    decoded = decode(data, lambda hid: ("handle", hid))
    assert decoded == [("handle", 1), ("handle", 2), ("handle", 3)]
    assert type(seen[0]) is S


def test_wire_namedtuple_crosses_as_its_values():
    import collections

    P = collections.namedtuple("P", "x y")
    assert decode(encode(P(1, 2), lambda o: 0), lambda h: h) == (1, 2)


def test_wire_dict_views_cross_as_views():
    import collections

    for view in ({1: 2}.keys(), {1: [2]}.values(), {1: 2}.items(), collections.OrderedDict(a=1).keys()):
        decoded = decode(encode(view, lambda o: pytest.fail("not plain")), lambda h: pytest.fail("handle"))
        assert list(decoded) == list(view) and type(decoded).__name__.endswith(type(view).__name__[-4:])
    assert decode(encode({1: 2, 3: 4}.keys(), None), None) == {1, 3}


def test_wire_containers_of_a_request_keep_their_identity():
    shared = [1]
    cyclic: list = []
    cyclic.append(cyclic)
    sent: list = []
    data = encode((shared, {"k": shared}, (cyclic,)), None, registry=sent)
    assert sent[0] is shared and sent[2] is cyclic  # numbered in the order met; the alias is a reference
    received: list = []
    a, d, (c,) = decode(data, None, refs=received, number=True)
    assert d["k"] is a and c[0] is c and len(received) == 3
    # A reply refers to the request's containers by number: the sender gets its own objects back.
    known = {id(obj): n for n, obj in enumerate(received)}
    assert decode(encode([a, c], None, known=known), None, refs=sent) == [shared, cyclic]
    assert decode(encode([a, c], None, known=known), None, refs=sent)[0] is shared
    with pytest.raises(WireError):
        decode(encode(a, None, known=known), None)  # a reference with no request to refer to


@pytest.mark.parametrize("junk", [b"", b"z", b"l\x00\x00\x00\x02N", b"s\xff\xff\xff\xffab", b"NN", b"i\x00\x00\x00\x09",
                                  b"h\x00", b"d\x00\x00\x00\x01l\x00\x00\x00\x00N", b"R\x00\x00\x00\x05",
                                  b"K\x00\x00\x00\x01l\x00\x00\x00\x00"])
def test_wire_rejects_malformed_frames(junk):
    with pytest.raises(WireError):
        decode(junk, lambda h: h)


# ---------------------------------------------------------------------------------------------- classes


def test_classes_from_what_happened(ex):
    tests = ["assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 6"]
    jobs = [
        Job("def f(x):\n    return 2 * x", tests),
        Job("def f(x):\n    return 2 * x if x < 3 else 0", tests),
        Job("def f(x):\n    return 2 * x if x < 2 else 1 // 0", tests),
        Job("def f(x) return 2 * x", tests),
        # Text that *mentions* a timeout is still a runtime error: classes never come from error text.
        Job("def f(x):\n    raise RuntimeError('timeout timeout Timeout')", tests),
        Job("def f(x):\n    raise AssertionError('raised by the program, not the test')", tests),
        Job("def g(x):\n    return 2 * x", tests),  # NameError in the test: the program lacks f
    ]
    out = ex.run(jobs)
    assert [o.status for o in out] == [Status.PASSED, Status.WRONG_ANSWER, Status.RUNTIME_ERROR,
                                       Status.SYNTAX_ERROR, Status.RUNTIME_ERROR, Status.RUNTIME_ERROR,
                                       Status.RUNTIME_ERROR]
    assert [o.passed for o in out] == [3, 2, 1, 0, 0, 0, 0]
    assert out[2].tests[2].error_type == "ZeroDivisionError" and "ZeroDivisionError" in out[2].error_tail
    assert out[3].tests[0].error_type == "SyntaxError"
    assert out[4].tests[0].error_type == "RuntimeError"
    assert out[6].tests[0].error_type == "NameError"


def test_program_compiles_as_plain_python_would(ex):
    """The harness's own `from __future__ import annotations` must not leak into the program: an annotation
    naming an unimported type is a NameError at definition time in plain Python."""
    (out,) = ex.run([Job("def f(a: List[int]):\n    return a", ["assert f([1]) == [1]"])])
    assert out.status is Status.RUNTIME_ERROR and out.tests[0].error_type == "NameError"


def test_slow_test_fails_alone_and_loops_are_killed(ex):
    code = "def f(x):\n    while x == 2:\n        pass\n    return x"
    (out,) = ex.run([Job(code, ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"], timeout=1.0)])
    assert [t.status for t in out.tests] == [Status.PASSED, Status.TIMEOUT, Status.PASSED]
    assert out.status is Status.TIMEOUT and out.tests[1].error_type == "Timeout"
    assert out.tests[1].duration >= 1.0  # the deadline never fires early
    assert out.runners == 2  # the looping runner was killed; the third test ran on a fresh one
    assert_clean(ex)


def test_infinite_loop_at_import_times_out_once(ex):
    (out,) = ex.run([Job("while True:\n    pass", ["assert f(1)", "assert f(2)"], timeout=1.0)])
    assert [t.status for t in out.tests] == [Status.TIMEOUT, Status.TIMEOUT]
    assert out.runners == 1  # loaded once: the second test shares the first one's failure, no second wait


# ----------------------------------------------------------------------------------------- stopping rule

LOOP = "def f(x):\n    while True:\n        pass"
FOUR_TESTS = [f"assert f({i}) == {i}" for i in range(4)]


def _timed(ex, job):
    t0 = time.perf_counter()
    (out,) = ex.run([job])
    return out, time.perf_counter() - t0


def test_stop_after_timeout_ends_a_looping_job_after_one_deadline(ex):
    never, never_s = _timed(ex, Job(LOOP, FOUR_TESTS, timeout=0.5))
    stop, stop_s = _timed(ex, Job(LOOP, FOUR_TESTS, timeout=0.5, stop_after="timeout"))
    # "never" waits out every test's deadline (deadlines never fire early); "timeout" only the first one.
    assert never_s >= 4 * 0.5 and all(t.error_type == "Timeout" for t in never.tests) and never.runners == 4
    assert stop_s < 4 * 0.5 and stop_s < never_s - 1.0
    assert [t.status for t in stop.tests] == [Status.TIMEOUT] * 4 and stop.status is Status.TIMEOUT
    assert stop.tests[0].error_type == "Timeout" and stop.tests[0].duration >= 0.5
    assert stop.error_tail == never.error_tail == stop.tests[0].error_tail  # the outcome speaks of the real one
    for t in stop.tests[1:]:
        assert (t.error_type, t.duration) == ("NotRun", 0.0)
        assert t.error_tail.startswith("not run: test 0 timed out") and "stop_after='timeout'" in t.error_tail
    assert stop.runners == 1 and stop.not_run == 3 and never.not_run == 0
    assert stop.passed == never.passed == 0 and stop.total == never.total == 4
    assert_clean(ex)


def test_stop_after_timeout_keeps_running_past_other_failures(ex):
    code = "def f(x):\n    while x == 2:\n        pass\n    return 0"  # wrong on 1, loops on 2
    (out,) = ex.run([Job(code, FOUR_TESTS, timeout=0.5, stop_after="timeout")])
    assert [t.status for t in out.tests] == [Status.PASSED, Status.WRONG_ANSWER, Status.TIMEOUT, Status.TIMEOUT]
    assert [t.error_type for t in out.tests] == [None, "AssertionError", "Timeout", "NotRun"]
    assert out.tests[3].error_tail.startswith("not run: test 2 timed out")
    assert out.status is Status.WRONG_ANSWER and out.error_tail == out.tests[1].error_tail  # the first failure


def test_stop_after_failure_stops_at_the_first_failing_test(ex):
    wrong = "def f(x):\n    return 0 if x < 2 else -1"  # passes test 0, wrong from test 1 on
    crash = "def f(x):\n    return x if x < 1 else 1 // 0"
    out = ex.run([Job(wrong, FOUR_TESTS, stop_after="failure"), Job(crash, FOUR_TESTS, stop_after="failure"),
                  Job("def f(x):\n    return x", FOUR_TESTS, stop_after="failure")])
    assert [t.status for t in out[0].tests] == [Status.PASSED] + [Status.WRONG_ANSWER] * 3
    assert [t.error_type for t in out[0].tests] == [None, "AssertionError", "NotRun", "NotRun"]
    assert out[0].tests[2].error_tail == "not run: test 1 failed (wrong_answer); stop_after='failure'"
    assert [t.duration for t in out[0].tests[2:]] == [0.0, 0.0]
    assert out[0].status is Status.WRONG_ANSWER and out[0].error_tail == out[0].tests[1].error_tail
    assert (out[0].passed, out[0].not_run, out[0].total) == (1, 2, 4)
    assert [t.status for t in out[1].tests] == [Status.PASSED] + [Status.RUNTIME_ERROR] * 3
    assert out[1].tests[1].error_type == "ZeroDivisionError" and out[1].tests[3].error_type == "NotRun"
    assert "test 1 failed (runtime_error)" in out[1].tests[3].error_tail
    assert out[2].all_passed and out[2].not_run == 0  # nothing fails: every test runs
    assert_clean(ex)


def test_stop_after_never_is_the_default_and_runs_every_test(ex):
    code = "def f(x):\n    while x == 1:\n        pass\n    return 0"  # loops on 1, wrong on 2 and 3
    default, never = ex.run([Job(code, FOUR_TESTS, timeout=0.5), Job(code, FOUR_TESTS, timeout=0.5,
                                                                       stop_after="never")])
    assert Job("", ["assert True"]).stop_after == "never"
    for out in (default, never):
        assert [t.status for t in out.tests] == [Status.PASSED, Status.TIMEOUT, Status.WRONG_ANSWER,
                                                 Status.WRONG_ANSWER]
        assert out.not_run == 0 and out.runners == 2


def test_programs_that_never_load_fail_every_test_alike_under_any_rule(ex):
    for rule in ("never", "timeout", "failure"):
        broken, looping, raising = ex.run([
            Job("def f(x) return x", FOUR_TESTS, stop_after=rule),
            Job("while True:\n    pass", FOUR_TESTS, timeout=0.5, stop_after=rule),
            Job("raise ValueError('at import')", FOUR_TESTS, stop_after=rule)])
        assert [t.error_type for t in broken.tests] == ["SyntaxError"] * 4, rule
        assert [t.status for t in looping.tests] == [Status.TIMEOUT] * 4 and looping.runners == 1, rule
        assert {t.error_type for t in looping.tests} == {"Timeout"}, rule
        assert [t.error_type for t in raising.tests] == ["ValueError"] * 4, rule
        assert broken.not_run == looping.not_run == raising.not_run == 0


@pytest.mark.parametrize("bad", ["sometimes", "", "Timeout", None, 1, True])
def test_stop_after_is_validated_by_the_caller(ex, bad):
    with pytest.raises(ValueError, match="Mbpp/2: stop_after must be one of never, timeout, failure"):
        ex.run([Job("def f(x):\n    return x", FOUR_TESTS, task_id="Mbpp/2", stop_after=bad)])


def test_the_judge_refuses_a_bad_stop_after_that_reaches_it(ex):
    """The judge validates the message too: past the caller's check (here: by hand) a bad rule is a clear
    harness error on every test, and no program runs."""
    job = Job(LOOP, FOUR_TESTS, timeout=0.5, stop_after="sometimes")
    t0 = time.perf_counter()
    res = ex._run_one(0, job)
    assert time.perf_counter() - t0 < 2.0 and res["runners"] == 0
    assert [(s, e) for s, _, e, _ in res["tests"]] == [("runtime_error", "HarnessError")] * 4
    assert "invalid stop_after 'sometimes'" in res["tests"][0][3]
    (out,) = ex.run([Job("def f(x):\n    return x", FOUR_TESTS)])  # the judge serves on
    assert out.all_passed


def test_remote_handles_mutation_and_iteration(ex):
    code = (
        "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
        "def chain(pairs):\n    return sum(p.a for p in pairs)\n"
        "def gen(n):\n    return (i * i for i in range(n))\n"
        "def push(lst):\n    lst.append(9)\n"
        "def same(p):\n    return p\n"
    )
    tests = ["assert chain([Pair(1, 2), Pair(3, 4)]) == 4", "assert list(gen(3)) == [0, 1, 4]",
             "x = [1]\npush(x)\nassert x == [1, 9]", "p = Pair(1, 2)\nassert same(p) == p and p.a == 1",
             "assert Pair(1, 2) != Pair(1, 2)"]
    (out,) = ex.run([Job(code, tests)])
    assert out.status is Status.PASSED, out.error_tail


def test_setup_is_trusted_and_builtin_shadowing(ex):
    # MBPP 126's function is called `sum`; a program name shadowing a builtin binds only when it is the
    # entry point (or the only program name the test uses), so `def len` cannot rig the test's own len().
    (a, b, c) = ex.run([
        Job("def sum(a, b):\n    return a + b", ["assert sum(1, 2) == 3"]),
        Job("def len(x):\n    return 3\ndef f():\n    return [1]", ["assert len(f()) == 3"]),
        Job("import math\nmath.pi = 3\ndef f():\n    return 3", ["assert f() == math.pi"], setup="import math"),
    ])
    assert a.status is Status.PASSED
    assert b.status is Status.WRONG_ANSWER
    assert c.status is Status.WRONG_ANSWER


def test_isolation_seen_from_inside(ex, monkeypatch):
    probe = (
        "import os, resource\n"
        "def env():\n    return sorted(os.environ)\n"
        "def cwd():\n    return os.getcwd()\n"
        "def limit(name):\n    return resource.getrlimit(getattr(resource, name))[0]\n"
    )
    (out,) = ex.run([Job(probe, [
        "assert not any(k.endswith(('TOKEN', 'KEY')) or k.startswith('AWS_') for k in env())",
        "assert 'HF_TOKEN' not in env() and 'SPARK_SECRET' not in env()",
        "assert cwd().startswith(('/dev/shm', '/tmp')) and 'spark-trl-judge-' in cwd()",
        "assert limit('RLIMIT_AS') == 2048 * 1024 * 1024",
        "assert limit('RLIMIT_CORE') == 0 and 0 < limit('RLIMIT_NOFILE') <= 64",
        "assert 0 < limit('RLIMIT_FSIZE') <= 16 * 1024 * 1024 and 0 < limit('RLIMIT_CPU') < 60",
    ])])
    assert out.status is Status.PASSED, [(t.status, t.error_tail) for t in out.tests]


LAYER_PROBE = """
import os, socket
def pidns():  # the runner's parent is the zygote, pid 1 of its namespace
    return os.getppid() == 1
def seccomp():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except PermissionError:
        return True
    return False
def readable(path):  # Landlock: PermissionError; the private view: the file is not there
    try:
        open(path, 'rb').close()
        return 'read'
    except PermissionError:
        return 'denied'
    except FileNotFoundError:
        return 'absent'
def work_dir_size():
    st = os.statvfs('.')
    return st.f_blocks * st.f_frsize
def nproc_limited():  # RLIMIT_NPROC counts per user namespace: set only inside one
    import resource
    return resource.getrlimit(resource.RLIMIT_NPROC) == (32, 32)
"""


@pytest.mark.parametrize("layers", [{}, {"namespaces": False}, {"seccomp": False}, {"landlock": False},
                                    {"namespaces": False, "seccomp": False, "landlock": False}])
def test_layers_reported_are_the_layers_in_force(tmp_path, layers):
    """What ``ex.layers`` says is on, a program sees from inside; what it says is off, it does not."""
    host_file = tmp_path / "host.txt"
    host_file.write_text("x")
    with Executor(workers=1, timeout=5.0, disk_mb=8, **layers) as one:
        on = one.layers
        for key, wanted in (("namespaces", ("userns", "pidns", "mountns")), ("seccomp", ("seccomp",)),
                            ("landlock", ("landlock",))):
            if layers.get(key, True) is False:
                assert not any(on[layer] for layer in wanted)  # off when asked off, whatever the machine has
        expected_read = "absent" if on["mountns"] else "denied" if on["landlock"] else "read"
        tests = [f"assert pidns() == {on['pidns']}", f"assert seccomp() == {on['seccomp']}",
                 f"assert readable({str(host_file)!r}) == {expected_read!r}"]
        if on["mountns"]:
            tests.append("assert work_dir_size() == 8 << 20")
        tests.append(f"assert nproc_limited() == {on['userns']}")
        (out,) = one.run([Job(LAYER_PROBE, tests)])
        assert out.all_passed, [(t.status, t.error_tail[-200:]) for t in out.tests]
    if not layers and os.getuid() == 0:
        # This machine (and CI) runs as root on a recent kernel: every layer is available and on by default.
        assert all(on.values()), on


def test_judge_death_is_survived_and_replaced():
    with Executor(workers=1, timeout=2.0) as ex:
        judge = ex._judges[0].popen
        judge.kill()
        judge.wait()
        out = ex.run([Job("def f():\n    return 1", ["assert f() == 1"])] * 2)
        # The first job on the dead judge counts as a harness runtime error or runs on its replacement.
        assert out[1].status is Status.PASSED
        assert ex._judges[0].popen.pid != judge.pid


def test_dataset_faults_raise_before_running(ex):
    with pytest.raises(ValueError, match="Mbpp/7: tests must be a non-empty list"):
        ex.run([Job("x = 1", [], task_id="Mbpp/7")])
    with pytest.raises(ValueError, match="Mbpp/8: test 1 does not compile"):
        ex.run([Job("x = 1", ["assert True", "assert (("], task_id="Mbpp/8")])
    with pytest.raises(ValueError, match="HumanEval/3: test setup does not compile"):
        ex.run([Job("x = 1", ["assert True"], setup="import (", task_id="HumanEval/3")])


def test_order_kept_and_parallel(ex):
    import threading

    jobs = [Job(f"def f():\n    return {i}", [f"assert f() == {i}"]) for i in range(40)]
    out = ex.run(jobs)
    assert all(o.status is Status.PASSED for o in out)
    # Two slow programs: at some moment both judges have a runner (counted in /proc), i.e. they ran at once.
    assert_clean(ex)  # the last runners of a batch are cleaned up after its results went out
    idle = {j.popen.pid: len(_descendants(j.popen.pid)) for j in ex._judges}
    busy_at_once, done = [], threading.Event()

    def watch():
        while not done.is_set():
            busy_at_once.append(sum(len(_descendants(pid)) > n for pid, n in idle.items()))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        slow = [Job("import time\ndef f():\n    time.sleep(1.0)\n    return 1", ["assert f() == 1"])] * 2
        assert all(o.all_passed for o in ex.run(slow))
    finally:
        done.set()
        watcher.join()
    assert max(busy_at_once) == 2
    assert_clean(ex)


def test_stale_work_dirs_of_dead_judges_are_removed(tmp_path):
    from spark_trl.sandbox.workdir import remove_stale_roots as _remove_stale_roots

    dead = tmp_path / "spark-trl-judge-999999999-abc"  # above pid_max: no such process
    alive = tmp_path / f"spark-trl-judge-{os.getpid()}-abc"
    other = tmp_path / "unrelated-999999999-abc"
    for d in (dead, alive, other):
        (d / "sub").mkdir(parents=True)
    _remove_stale_roots(str(tmp_path))
    assert not dead.exists() and alive.exists() and other.exists()
