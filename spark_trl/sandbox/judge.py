"""The trusted judge: runs every test itself, against the program living in an untrusted runner.

A judge is a fresh interpreter (``python -I -S -B``, scrubbed environment; see ``executor.py``) that imports
the common stdlib modules, forks its zygote before it has seen any job, then serves jobs from its caller: it
extracts the program from a raw completion when asked (``Job.extract``), compiles it (a failure is a syntax
error, no process needed), asks the zygote for a runner, sends the program to the runner, and runs each test in
a fresh namespace of builtins + the test setup + the test's free names (``names.py``), where each name the test
takes from the program is a ``RemoteObject``: calling it sends the arguments to the runner as plain data and
decodes the result within a budget (``wire.py``).

A test passes only when the judge ran it to the end without an exception. Its class comes from what happened:
the test's own ``AssertionError`` is a wrong answer; an exception the program raised, a runner that died or
sent junk, or any other exception is a runtime error; the judge's deadline is a timeout.

Tests run one after another; the job's ``stop_after`` (``Job.stop_after``) may end the job at the first timeout
or the first failure, the remaining tests reported as not run (``NOT_RUN``) with the stopping test's status.
"""

from __future__ import annotations

import builtins
import collections
import os
import select
import signal
import socket
import time
import traceback

from ..outcome import NOT_RUN
from ..prompts import extract_code
from . import isolation, names, wire, workdir, zygote
from .runner import ERROR_TAIL, handles_refused, tail


class RemoteError(Exception):
    """An exception raised by the program in the runner (only its type name and traceback tail cross)."""

    def __init__(self, error_type: str, error_tail: str):
        super().__init__(error_type)
        self.error_type, self.error_tail = error_type, error_tail


class RunnerGone(BaseException):
    """The runner died or broke the protocol: the test fails as a runtime error and the runner is replaced."""

    def __init__(self, why: str, error_type: str = "ProcessDied"):
        super().__init__(why)
        self.error_type = error_type


class LoadFailed(BaseException):
    """The program failed to load: every test gets this result."""

    def __init__(self, status: str, error_type: str, error_tail: str):
        super().__init__(error_tail)
        self.status, self.error_type, self.error_tail = status, error_type, error_tail


# ============================================================================================= runners


class RunnerConnection:
    """The judge's view of one runner: its socket and, once the zygote's reply is read, its pid and pidfd."""

    def __init__(self, sock: socket.socket, judge: "Judge"):
        self.sock, self.judge = sock, judge
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.work_fd: int | None = None  # the work tmpfs of the private view, for its fill level
        self.remote_objects: dict = {}
        self.deadline: float | None = None
        self.dead = False
        self.loaded = False

    def attach(self) -> None:
        """Read the zygote's reply to our spawn: the pid (meaningful only without a pid namespace) and pidfd."""
        if self.pidfd is None:
            msg, fds, _, _ = socket.recv_fds(self.judge.zygote_sock, 8, 2)
            if len(msg) != 8 or not 1 <= len(fds) <= 2:
                raise SystemExit("the zygote died")
            self.pidfd = fds[0]
            self.work_fd = fds[1] if len(fds) == 2 else None
            # Under a pid namespace the zygote's pid numbers mean nothing here: the pidfd is the handle.
            self.pid = None if self.judge.cfg["pidns"] else wire.HANDLE_ID.unpack(msg)[0]

    def remote(self, ref) -> "RemoteObject":
        obj = self.remote_objects.get(ref)
        if obj is None:
            obj = self.remote_objects[ref] = RemoteObject(self, ref)
        return obj

    def _next_message(self, sent: list | None = None):
        """The next message (``sent``: the request's containers, for the reply's references); the runner's
        one-way load report comes first and is consumed here."""
        while True:
            try:
                msg = wire.decode(wire.recv_frame(self.sock, self.deadline), self.remote, wire.DECODE_BUDGET,
                                  refs=sent if self.loaded else None)
            except wire.DeadlineExpired:
                if not self.loaded:
                    raise LoadFailed("timeout", "Timeout", "the program did not finish loading before the deadline")
                raise
            except (wire.Closed, BrokenPipeError, ConnectionResetError):
                self.dead = True
                if not self.loaded:
                    raise LoadFailed("runtime_error", "ProcessDied", "the program's process died while loading")
                raise RunnerGone("the program's process died") from None
            except wire.WireError as exc:  # malformed, or more than the judge decodes: the program's fault
                self.dead = True
                if not self.loaded:
                    raise LoadFailed("runtime_error", "ProtocolError", f"the program's process sent junk: {exc}")
                raise RunnerGone(f"the program's process sent an unusable reply: {exc}", "ProtocolError") from None
            if self.loaded:
                return msg
            if msg == ("ready",):
                self.loaded = True
                continue
            self.dead = True
            if type(msg) is tuple and len(msg) == 3 and msg[0] == "loaderr":
                raise LoadFailed("runtime_error", str(msg[1])[:200], str(msg[2])[-ERROR_TAIL:])
            raise LoadFailed("runtime_error", "ProtocolError", "the program's process sent an invalid message")

    def request(self, *req):
        """Send one request, return the answer, after copying the call's in-place changes into the containers
        that were sent; the program's exception raises ``RemoteError``."""
        def to_ref(obj):
            if type(obj) is RemoteObject and obj._connection is self:
                return obj._ref
            raise wire.Unencodable(f"cannot send a {type(obj).__name__} to the program")

        if self.dead:
            raise RunnerGone("the program's process is gone")
        sent: list = []
        try:
            data = wire.encode(req, to_ref, registry=sent)
        except wire.Unencodable as exc:
            raise TypeError(str(exc)) from None
        try:
            wire.send_frame(self.sock, data)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # a dead runner shows as EOF on the read below
        reply = self._next_message(sent)
        if type(reply) is not tuple or not reply:
            self.dead = True
            raise RunnerGone("the program's process sent an invalid reply", "ProtocolError")
        if reply[0] == "ok" and len(reply) == 3 and type(reply[2]) is list:
            for change in reply[2]:
                self._copy_back(sent, change)
            return reply[1]
        if reply[0] == "err" and len(reply) == 3:
            raise RemoteError(str(reply[1])[:200], str(reply[2])[-ERROR_TAIL:])
        self.dead = True
        raise RunnerGone("the program's process sent an invalid reply", "ProtocolError")

    def _copy_back(self, sent: list, change) -> None:
        """Apply one in-place change (``(n, encoded new contents)``) to the n-th container that was sent."""
        if type(change) is not tuple or len(change) != 2 or type(change[0]) is not int or type(change[1]) is not bytes:
            self.dead = True
            raise RunnerGone("the program's process sent an invalid change", "ProtocolError")
        n, blob = change
        if not 0 <= n < len(sent):
            self.dead = True
            raise RunnerGone("the program's process changed no container of the request", "ProtocolError")
        try:
            new = wire.decode(blob, self.remote, wire.DECODE_BUDGET, refs=sent)
        except wire.WireError as exc:
            self.dead = True
            raise RunnerGone(f"the program's process sent an unusable change: {exc}", "ProtocolError") from None
        target = sent[n]
        if type(new) is not type(target):
            return  # a container changes its contents in place, never its type
        if isinstance(target, (list, bytearray)):
            target[:] = new
        elif isinstance(target, collections.deque):
            target.clear()
            target.extend(new)
        else:  # dict, set and the dict subclasses
            target.clear()
            target.update(new)

    def kill(self) -> None:
        """SIGKILL the runner (and its session when its pid means something here), wait until it is gone.
        Under a pid namespace the zygote then sweeps the namespace."""
        self.attach()
        try:
            if not self._exited():
                if self.pid is not None:
                    try:  # checked alive just above, so the pid has not been reused
                        os.killpg(self.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass
        # The runner's socket end closes only when every process holding it (the runner) has exited.
        end = time.monotonic() + 5.0
        try:
            self.sock.setblocking(False)
            while time.monotonic() < end:
                readable, _, _ = select.select([self.sock], [], [], 0.05)
                if readable:
                    try:
                        if not self.sock.recv(1 << 16):
                            break
                    except BlockingIOError:
                        continue
                    except OSError:
                        break
        finally:
            self.sock.close()
            select.select([self.pidfd], [], [], max(0.0, end - time.monotonic()))
            os.close(self.pidfd)
            if self.work_fd is not None:
                os.close(self.work_fd)
            self.dead = True

    def _exited(self) -> bool:
        readable, _, _ = select.select([self.pidfd], [], [], 0)
        return bool(readable)


class RemoteObject:
    """A program object that is not plain data, living in the runner. Usable as an argument of later calls,
    callable, its attributes/items/iteration fetched remotely; equal to another object of the same program as
    the program's own ``__eq__`` says, never to a value of the judge."""

    __slots__ = ("_connection", "_ref")

    def __init__(self, connection, ref):  # ref: a handle id, or the name of a global of the program
        object.__setattr__(self, "_connection", connection)
        object.__setattr__(self, "_ref", ref)

    def __call__(self, *args, **kwargs):
        return self._connection.request("call", self._ref, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._connection.request("getattr", self._ref, name)

    def __iter__(self):
        value = self._connection.request("iter", self._ref)
        return iter(value if type(value) is list else [])

    def __len__(self):
        try:
            value = self._connection.request("len", self._ref)
        except RemoteError as exc:  # list(obj) asks for a length hint first: unsized is no error there
            raise TypeError(f"remote len() failed: {exc}") from None
        if type(value) is not int:
            raise TypeError("remote len() did not return an int")
        return value

    def __bool__(self):
        return self._connection.request("bool", self._ref) is True

    def __str__(self):
        value = self._connection.request("str", self._ref)
        return value if type(value) is str else "<remote object>"

    def __getitem__(self, key):
        return self._connection.request("getitem", self._ref, key)

    def __contains__(self, item):
        return self._connection.request("contains", self._ref, item) is True

    def _compare(self, op: str, other):
        if type(other) is not RemoteObject or other._connection is not self._connection:
            return NotImplemented  # a program object is never equal to a judge value: identity decides
        return self._connection.request(op, self._ref, other) is True

    def __eq__(self, other):
        return self._compare("eq", other)

    def __ne__(self, other):
        return self._compare("ne", other)

    __hash__ = object.__hash__

    def __repr__(self):
        return f"<remote object {self._ref!r}>"


# =============================================================================================== tests


def classify(exc: BaseException) -> tuple[str, str | None, str]:
    """(status, error type, error tail) of the exception that ended a test."""
    if isinstance(exc, wire.DeadlineExpired):
        return "timeout", "Timeout", "the test did not finish before the deadline"
    if isinstance(exc, RemoteError):
        return "runtime_error", exc.error_type, exc.error_tail
    if isinstance(exc, RunnerGone):
        return "runtime_error", exc.error_type, str(exc)
    error_tail = tail("".join(traceback.format_exception_only(type(exc), exc)))
    if type(exc) is AssertionError:
        return "wrong_answer", "AssertionError", error_tail
    return "runtime_error", type(exc).__name__, error_tail


class _DeadlineTimer:
    """A SIGALRM backstop on the judge's own work in a test (it is trusted, but its inputs are not)."""

    def __init__(self):
        signal.signal(signal.SIGALRM, self._fire)

    @staticmethod
    def _fire(signum, frame):
        raise wire.DeadlineExpired()

    @staticmethod
    def arm(seconds: float):
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))

    @staticmethod
    def disarm():
        signal.setitimer(signal.ITIMER_REAL, 0)


class Judge:
    def __init__(self, caller_in: int, caller_out: int, cfg: dict, root: str):
        self.caller_in, self.caller_out, self.cfg, self.root = caller_in, caller_out, cfg, root
        self.work = os.path.join(root, isolation.WORK)
        os.mkdir(self.work, 0o700)
        self.pending: RunnerConnection | None = None
        self.retire = False  # set when this judge's work dir could not be emptied: the caller replaces it
        self.compiled: dict = {}
        self.timer = _DeadlineTimer()
        theirs, self.zygote_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            self.zygote_sock.close()
            for fd in (self.caller_in, self.caller_out):
                os.close(fd)
            try:
                zygote.boot(theirs, cfg, root)
            finally:
                os._exit(0)
        self.zygote_pid = pid
        theirs.close()
        if not select.select([self.zygote_sock], [], [], 60)[0]:
            raise RuntimeError("the zygote did not start")
        status = self.zygote_sock.recv(512)
        if status != zygote.READY:
            raise RuntimeError(f"the zygote failed to start: {status[1:].decode(errors='replace') or 'it died'}")

    # ---------------------------------------------------------------- runners
    def spawn(self, setup: str, code: str, memory_mb: int, cpu_seconds: int, deadline: float) -> RunnerConnection:
        """Ask the zygote for a runner on a socket pair of ours, then send the program to the runner itself (the
        zygote never holds one). One-way (the zygote's reply is read when first needed), so the first test's
        request is already queued when the runner starts serving."""
        mine, theirs = socket.socketpair()
        try:
            socket.send_fds(self.zygote_sock, [zygote.SPAWN + zygote.SPAWN_LIMITS.pack(memory_mb, cpu_seconds)],
                            [theirs.fileno()])
        except OSError:
            raise SystemExit("the zygote died") from None
        finally:
            theirs.close()
        connection = RunnerConnection(mine, self)
        # A program larger than the socket's buffer is sent while the runner reads it: bounded by the deadline.
        mine.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            wire.send_frame(mine, wire.encode(("load", setup, code), handles_refused))
        except socket.timeout:
            self.cleanup(connection)
            raise LoadFailed("timeout", "Timeout", "the program did not finish loading before the deadline") from None
        except OSError:
            pass  # the runner died: its EOF is read as the load's failure
        finally:
            mine.settimeout(None)
        return connection

    def cleanup(self, connection: RunnerConnection) -> None:
        """Kill the runner; the zygote sweeps its namespace and empties the work tmpfs, or (without them) the
        judge empties the work dir itself."""
        connection.kill()
        if self.cfg["pidns"] or self.cfg["mountns"]:
            self.zygote_sock.sendall(zygote.SWEEP)
        if not self.cfg["mountns"] and not workdir.empty(self.work):
            self.retire = True  # a tree it could not remove in time: no later runner may see it

    def disk_limit_reached(self, connection: RunnerConnection) -> bool:
        """The program filled its work dir (the tmpfs has no block or inode left; without the private view: a
        bounded walk of the work dir finds more bytes or files than the cap)."""
        if self.cfg["mountns"]:
            connection.attach()
            st = os.fstatvfs(connection.work_fd)
            return st.f_bavail == 0 or st.f_favail == 0
        return workdir.exceeds(self.work, self.cfg["disk_mb"] << 20, zygote.MAX_FILES)

    def finish(self) -> None:
        """Kill the last runner of a job and clean its files (after the result went out)."""
        connection, self.pending = self.pending, None
        if connection is not None:
            self.cleanup(connection)

    # ---------------------------------------------------------------- jobs
    def run_job(self, job: dict) -> dict:
        """Every test of one job, or up to the one that stops it (``stop_after``). The last runner is left for
        ``finish()``, called after the reply is sent."""
        t0 = time.perf_counter()
        tests = job["tests"]
        stop_after = job.get("stop_after", "never")
        if type(stop_after) is not str or stop_after not in wire.STOP_AFTER:
            # The caller validates it (Executor.validate); a message that still carries something else is a
            # fault of the harness: every test says so, no program runs.
            why = f"invalid stop_after {stop_after!r:.80} (expected one of {', '.join(wire.STOP_AFTER)})"
            return {"tests": [("runtime_error", 0.0, "HarnessError", why)] * len(tests),
                    "duration": time.perf_counter() - t0, "code": job.get("code", ""), "runners": 0}
        code = self._extracted(job) if job.get("extract") else job["code"]
        results: list = []
        try:
            program = compile(code, "<program>", "exec", dont_inherit=True)
        except BaseException as exc:  # SyntaxError, ValueError (null bytes), UnicodeError, RecursionError...
            error_tail = tail("".join(traceback.format_exception_only(type(exc), exc)))
            results = [("syntax_error", 0.0, type(exc).__name__, error_tail)] * len(tests)
            return {"tests": results, "duration": time.perf_counter() - t0, "code": code}
        setup_code = self._compiled(job["setup"], "<setup>")
        test_codes = [self._compiled(t, f"<test {i}>", with_free_names=True) for i, t in enumerate(tests)]
        timeout = float(job["timeout"])
        cpu = int(timeout * (len(tests) + 1)) + 2
        connection: RunnerConnection | None = None
        program_stores: list = []  # the program's top-level names, computed when a test needs them
        load_failure = None
        runners = 0
        try:
            for test_code in test_codes:
                if load_failure is not None:  # the program never loaded: every test fails the same way
                    results.append(load_failure)
                    continue
                start = time.perf_counter()
                deadline = time.monotonic() + timeout
                try:
                    if connection is None:
                        runners += 1
                        connection = self.spawn(job["setup"], code, job["memory_mb"], cpu, deadline)
                    connection.deadline = deadline
                    self.timer.arm(deadline - time.monotonic() + 0.25)
                    try:
                        self._run_test(test_code, setup_code, connection, program, program_stores,
                                       job.get("entry_point") or "")
                    finally:
                        self.timer.disarm()
                    status, error_type, error_tail = "passed", None, ""
                except LoadFailed as exc:
                    load_failure = (exc.status, time.perf_counter() - start, exc.error_type, exc.error_tail)
                    results.append(load_failure)
                    continue
                except BaseException as exc:  # noqa: BLE001 - classify what happened
                    status, error_type, error_tail = classify(exc)
                if connection is not None and not connection.dead and status != "timeout" \
                        and self.disk_limit_reached(connection):
                    # Whatever the program did with ENOSPC: a resource error, like running out of memory.
                    status, error_type = "runtime_error", "DiskLimitExceeded"
                    error_tail = f"the program filled its work dir ({self.cfg['disk_mb']} MiB, {zygote.MAX_FILES} files)"
                    connection.dead = True
                results.append((status, time.perf_counter() - start, error_type, error_tail))
                if connection is not None and (status == "timeout" or connection.dead):
                    self.cleanup(connection)  # the next test gets a fresh runner
                    connection = None
                if status != "passed" and (stop_after == "failure" or
                                           (stop_after == "timeout" and status == "timeout")):
                    k = len(results) - 1
                    why = f"not run: test {k} timed out" if status == "timeout" else \
                        f"not run: test {k} failed ({status})"
                    results += [(status, 0.0, NOT_RUN, f"{why}; stop_after={stop_after!r}")] * \
                        (len(test_codes) - len(results))
                    break
        except BaseException:
            if connection is not None:
                self.cleanup(connection)
            raise
        finally:
            self.timer.disarm()
        self.pending = connection
        return {"tests": results, "duration": time.perf_counter() - t0, "code": code, "runners": runners}

    def _extracted(self, job: dict) -> str:
        """The program in a raw completion, extracted here rather than on the caller's thread; under the job's
        deadline (the raw text, for compile() to judge, when it fails or runs out of time)."""
        text = job["code"]
        try:
            self.timer.arm(float(job["timeout"]))
            try:
                return extract_code(text, job.get("entry_point") or None)
            finally:
                self.timer.disarm()
        except BaseException:  # noqa: BLE001 - RecursionError, MemoryError, the deadline: the program's problem
            return text

    def _compiled(self, source: str, name: str, with_free_names: bool = False):
        """Trusted dataset code, compiled once (with a test's free names): GRPO sends the same tests for every
        completion of a group."""
        key = (source, name, with_free_names)
        compiled = self.compiled.get(key)
        if compiled is None:
            if len(self.compiled) > 4096:
                self.compiled.clear()
            code = compile(source, name, "exec", dont_inherit=True)
            compiled = self.compiled[key] = (code, names.free_globals(code)) if with_free_names else code
        return compiled

    def _run_test(self, test, setup_code, connection: RunnerConnection, program, program_stores: list,
                  entry_point: str) -> None:
        test_code, test_free = test
        namespace: dict = {"__name__": "__main__", "__builtins__": builtins}
        exec(setup_code, namespace)

        def stores():
            if not program_stores:
                program_stores.append(names.stored_names(program))
            return program_stores[0]

        names.bind_free_names(namespace, test_free, entry_point, connection.remote, stores)
        exec(test_code, namespace)


# ========================================================================================= the process

# Imported once in the judge, before the zygote is forked: runners find them loaded.
PREIMPORT = ("math", "cmath", "re", "collections", "itertools", "functools", "heapq", "bisect", "string",
             "typing", "operator", "copy", "random", "statistics", "fractions", "decimal", "datetime",
             "json", "hashlib", "array", "struct", "sys", "os", "time", "traceback", "unicodedata",
             "calendar", "textwrap", "numbers", "dataclasses", "enum", "abc", "io", "pprint", "_sitebuiltins",
             "contextlib", "weakref", "types", "binascii", "base64", "zlib", "locale", "inspect", "ast")


def main() -> None:
    """Entry point of a judge process (see ``Executor._start_judge``)."""
    caller_in, caller_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # No PR_SET_PDEATHSIG here: it fires when the *thread* that started us exits, and callers start judges
    # from worker threads. A judge exits when its input pipe closes (the caller is gone).
    isolation.set_dumpable(False)
    cfg = wire.read_message(caller_in)
    # A backstop on the judge's own memory: a test may allocate from a program's answer (`"a" * f(3)` with
    # f returning 10**10); that is then the test's MemoryError, not the host's out-of-memory killer.
    isolation.limit_address_space(2 * cfg["memory_mb"] + (wire.DECODE_BUDGET >> 20) + 512)
    import importlib
    import tempfile

    for name in PREIMPORT:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import _sitebuiltins  # quit()/exit() as under `python -c` (the judge runs without site)

    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    root = tempfile.mkdtemp(prefix=f"{workdir.ROOT_PREFIX}{os.getpid()}-", dir=cfg["tmp_dir"])
    report = isolation.probe(scratch=root)
    layers = {
        "userns": cfg["namespaces"] and report["userns"] is None,
        "pidns": cfg["namespaces"] and report["pidns"] is None,
        "mountns": cfg["namespaces"] and report["mountns"] is None,
        "seccomp": cfg["seccomp"] and report["seccomp"] is None,
        "landlock": cfg["landlock"] and report["landlock"] is None,
    }

    def _terminated(signum, frame):  # SIGTERM/SIGHUP: remove our files; runners die with us (PDEATHSIG chain)
        workdir.remove_tree(root)
        os._exit(0)

    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGHUP, _terminated)
    try:
        judge = Judge(caller_in, caller_out, dict(layers, disk_mb=cfg["disk_mb"]), root)
        wire.write_message(caller_out, {"ready": True, "probe": report, "layers": layers, "root": root,
                                        "pid": os.getpid()})
        while True:
            try:
                job = wire.read_message(caller_in)
            except wire.Closed:
                break
            result = judge.run_job(job)
            if not layers["mountns"]:
                # The host work dir must be empty before the next job: clean before replying, so that the reply
                # can say when it could not be (the zygote's fresh tmpfs needs no such check).
                judge.finish()
            result["retire"] = judge.retire
            wire.write_message(caller_out, result)
            judge.finish()
            if judge.retire:
                break
    finally:
        workdir.remove_tree(root)
