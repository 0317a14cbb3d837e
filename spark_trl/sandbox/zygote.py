"""The zygote: a clean copy of the judge, forked before it saw any job, that forks one runner per program.

Forking runners from here, not from the judge, is what keeps other programs and the tests out of a runner's
memory: the judge holds every program and test it handled, even as freed bytes; the zygote never receives any
(a runner gets its program from the judge on its own socket, after the fork).

With namespaces on, the zygote sets up once, before its first runner: a user namespace; pid 1 of a pid namespace
holding every runner (``kill(-1)`` from the namespace's init sweeps it); a mount namespace with the private,
read-only view of the file system and a size-capped tmpfs as work dir (``isolation.enter_private_view``). Then
it assembles the Landlock ruleset and the seccomp filter that each runner applies to itself.

Messages from the judge, one per datagram of a SOCK_SEQPACKET pair: ``SPAWN`` (the runner's limits as two
numbers, the runner's socket as an fd) and ``SWEEP`` (kill whatever is left in the namespace, empty the work
tmpfs: its inode cap bounds what a runner can leave there; a new tmpfs where emptying fails). The reply to a spawn is the runner's pid, its pidfd and (with the private view) an ``O_PATH`` fd of the
work dir, so that the judge can see how full it is.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import struct

from . import isolation, landlock, runner, seccomp, wire, workdir

SPAWN = b"S"
SWEEP = b"W"
READY = b"R"
FAILED = b"E"
SPAWN_LIMITS = struct.Struct("!QQ")  # memory_mb, cpu_seconds: all a spawn request carries besides the socket
MAX_FILES = 4096  # inodes of the work tmpfs: a directory chain or a million empty files stop here


def boot(sock: socket.socket, cfg: dict, root: str) -> None:
    """The judge's fork at start-up, before any job. Reports READY (or FAILED and why) on ``sock``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    isolation.set_parent_death_signal()
    work = os.path.join(root, isolation.WORK)
    try:
        if cfg["userns"]:
            isolation.enter_user_namespace()
        if cfg["pidns"]:
            isolation.unshare(isolation.CLONE_NEWPID)
            pid = os.fork()
            if pid:  # outside the namespace: only waits for its init (the zygote) and exits with it
                sock.close()
                _wait_for(pid)
                os._exit(0)
            isolation.set_parent_death_signal()
            if os.getpid() != 1:
                raise OSError("not pid 1 of the new pid namespace")
        if cfg["mountns"]:
            isolation.enter_private_view(root, *isolation.visible_paths())
            isolation.fresh_work_dir(work, cfg["disk_mb"], MAX_FILES)
        ruleset_fd = None
        if cfg["landlock"]:
            # Writable: the work dir. With the private view it is a mount point, which Landlock's path walk
            # skips: the rule goes on its parent, the view's read-only directory that holds nothing else.
            ruleset_fd = landlock.ruleset(landlock.python_read_paths() + ["/dev/null"],
                                          [root if cfg["mountns"] else work])
        if cfg["seccomp"]:
            seccomp.prepare()
    except BaseException as exc:  # noqa: BLE001 - the judge reports it and fails to start
        sock.send(FAILED + f"{type(exc).__name__}: {exc}".encode()[:500])
        os._exit(1)
    # Everything the zygote holds now is shared with its runners copy-on-write: keep the runners' garbage
    # collections off it (a collection writes to every object it visits, copying the page in each runner).
    gc.freeze()
    sock.send(READY)
    serve(sock, cfg, work, ruleset_fd)


def _wait_for(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return


def serve(sock: socket.socket, cfg: dict, work: str, ruleset_fd: int | None) -> None:
    namespace_init = cfg["pidns"] and os.getpid() == 1
    work_fd = os.open(work, os.O_PATH | os.O_DIRECTORY) if cfg["mountns"] else None  # the judge's view of it
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
            if cfg["mountns"] and not workdir.empty(work, MAX_FILES + 1, 5.0):
                # Emptying (at most MAX_FILES entries, usually none) is cheaper than a new tmpfs, whose
                # unmount waits for an RCU grace period; the new tmpfs is the fallback that cannot fail.
                isolation.fresh_work_dir(work, cfg["disk_mb"], MAX_FILES)
                os.close(work_fd)
                work_fd = os.open(work, os.O_PATH | os.O_DIRECTORY)
            continue
        runner_sock = socket.socket(fileno=fds[0])
        pid = os.fork()
        if pid == 0:
            sock.close()
            runner.start(runner_sock, dict(cfg, memory_mb=memory_mb, cpu_seconds=cpu_seconds), work, ruleset_fd)
        runner_sock.close()
        pidfd = os.pidfd_open(pid)  # before any reaping: the pid cannot have been reused
        socket.send_fds(sock, [wire.HANDLE_ID.pack(pid)], [pidfd] + ([work_fd] if work_fd is not None else []))
        os.close(pidfd)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
