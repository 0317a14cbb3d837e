"""The zygote: a clean copy of the judge, forked before it saw any job, that forks one runner per program.

Forking runners from here, not from the judge, is what keeps the tests out of a runner's memory: the judge
holds every test it ran, even as freed bytes; the zygote never receives one. With namespaces on, the zygote
enters a user namespace and becomes pid 1 of a pid namespace of its own, so every runner lives in it and the
zygote can sweep it (``kill(-1)`` from the namespace's init kills everything else in it).

Messages from the judge, on a socket pair: ``SPAWN`` (with the runner's socket as an fd and a pickled request)
and ``SWEEP`` (kill whatever is left in the namespace). The reply to a spawn is the runner's pid and pidfd.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket

from . import isolation, runner, wire

SPAWN = b"S"
SWEEP = b"W"


def boot(sock: socket.socket, cfg: dict, root: str, ruleset_fd: int | None) -> None:
    """The judge's fork at start-up, before any job: enter a user namespace, then make the zygote pid 1 of a
    pid namespace of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    isolation.set_parent_death_signal()
    if cfg["userns"]:
        isolation.enter_user_namespace()
    if cfg["pidns"]:
        isolation.unshare(isolation.CLONE_NEWPID)
        pid = os.fork()
        if pid:  # outside the namespace: only waits for its init (the zygote) and exits with it
            sock.close()
            while True:
                try:
                    os.waitpid(pid, 0)
                    break
                except InterruptedError:
                    continue
                except ChildProcessError:
                    break
            os._exit(0)
        isolation.set_parent_death_signal()
        if os.getpid() != 1:
            os._exit(3)
    serve(sock, cfg, root, ruleset_fd)


def serve(sock: socket.socket, cfg: dict, root: str, ruleset_fd: int | None) -> None:
    namespace_init = cfg["pidns"] and os.getpid() == 1
    while True:
        readable, _, _ = select.select([sock], [], [], 0.2)
        _reap()
        if not readable:
            continue
        try:
            op, fds, _, _ = socket.recv_fds(sock, 1, 1)
            if op == SPAWN and len(fds) == 1:
                request = pickle.loads(wire.recv_frame(sock, None))
            elif op != SWEEP:
                os._exit(0)
        except (wire.Closed, EOFError, OSError):
            os._exit(0)
        if namespace_init:
            # Nothing of an earlier runner may survive: kill everything in our pid namespace but ourselves.
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _reap()
        if op == SWEEP:
            continue
        runner_sock = socket.socket(fileno=fds[0])
        pid = os.fork()
        if pid == 0:
            sock.close()
            runner_cfg = dict(cfg, setup=request["setup"], memory_mb=request["memory_mb"],
                              cpu_seconds=request["cpu_seconds"])
            runner.start(runner_sock, request["code"], runner_cfg, root, ruleset_fd)
        runner_sock.close()
        pidfd = os.pidfd_open(pid)  # before any reaping: the pid cannot have been reused
        socket.send_fds(sock, [wire.HANDLE_ID.pack(pid)], [pidfd])
        os.close(pidfd)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
