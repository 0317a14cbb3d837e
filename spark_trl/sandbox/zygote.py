"""The zygote: a clean copy of the judge, forked before it saw any job, that forks one runner per program.

Forking runners from here, not from the judge, is what keeps other programs and the tests out of a runner's
memory: the judge holds every program and test it handled, even as freed bytes; the zygote never receives any
(a runner gets its program from the judge on its own socket, after the fork). With namespaces on, the zygote
enters a user namespace and becomes pid 1 of a pid namespace of its own, so every runner lives in it and the
zygote can sweep it (``kill(-1)`` from the namespace's init kills everything else in it).

Messages from the judge, one per datagram of a SOCK_SEQPACKET pair: ``SPAWN`` (the runner's limits as two
numbers, the runner's socket as an fd) and ``SWEEP`` (kill whatever is left in the namespace). The reply to a
spawn is the runner's pid and pidfd.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct

from . import isolation, runner, wire

SPAWN = b"S"
SWEEP = b"W"
SPAWN_LIMITS = struct.Struct("!QQ")  # memory_mb, cpu_seconds: all a spawn request carries besides the socket


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
            msg, fds, _, _ = socket.recv_fds(sock, 1 + SPAWN_LIMITS.size, 1)
        except OSError:
            os._exit(0)
        op = msg[:1]
        if op == SPAWN and len(fds) == 1 and len(msg) == 1 + SPAWN_LIMITS.size:
            memory_mb, cpu_seconds = SPAWN_LIMITS.unpack(msg[1:])
        elif op != SWEEP:
            os._exit(0)  # the judge is gone (an empty read) or broke the protocol
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
            runner.start(runner_sock, dict(cfg, memory_mb=memory_mb, cpu_seconds=cpu_seconds), root, ruleset_fd)
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
