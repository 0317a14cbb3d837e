"""Process-level isolation of the untrusted runner, and the probe of which layers this machine offers.

Applied in the runner (a process forked by the zygote, see ``zygote.py``) before any generated code runs:
session of its own, parent-death signal, work dir as cwd, scrubbed environment, stdio on /dev/null, resource
limits; the zygote itself enters a user namespace and becomes pid 1 of a pid namespace holding every runner.
The filters live beside this file: ``seccomp.py`` (syscalls) and ``landlock.py`` (files, TCP, signals).

``probe()`` reports which layers work, each tried once in a throw-away child.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal

from . import landlock, seccomp
from .libc import ARCH, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER, PR_SET_DUMPABLE, PR_SET_PDEATHSIG, prctl, unshare


def set_dumpable(flag: bool) -> None:
    """PR_SET_DUMPABLE=0: same-uid processes can no longer ptrace us or read /proc/<pid>/mem."""
    prctl(PR_SET_DUMPABLE, int(flag))


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    prctl(PR_SET_PDEATHSIG, int(sig))


def enter_user_namespace() -> None:
    """A new user namespace mapping our uid/gid onto themselves: no privilege gained or lost outside it, and
    the capabilities needed inside it to create a pid namespace without being root."""
    uid, gid = os.getuid(), os.getgid()
    unshare(CLONE_NEWUSER)
    with open("/proc/self/setgroups", "w") as fh:
        fh.write("deny")
    with open("/proc/self/uid_map", "w") as fh:
        fh.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as fh:
        fh.write(f"{gid} {gid} 1")


_ENV_KEEP = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}


def scrubbed_env(home: str | None = None) -> dict[str, str]:
    """A minimal environment: nothing from the caller's (no tokens, keys, credentials, proxies, paths)."""
    env = dict(_ENV_KEEP)
    env["PYTHONHASHSEED"] = "0"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if home:
        env["HOME"] = env["TMPDIR"] = home
    return env


def set_limits(memory_mb: int, cpu_seconds: int, fsize_mb: int = 16, nofile: int = 64,
               nproc: int | None = None) -> None:
    """Resource limits of the runner (soft = hard, so the runner cannot raise them back)."""

    def lim(which, value):
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))

    lim(resource.RLIMIT_AS, int(memory_mb) * 1024 * 1024)
    lim(resource.RLIMIT_CPU, max(1, int(cpu_seconds)))
    lim(resource.RLIMIT_FSIZE, int(fsize_mb) * 1024 * 1024)
    lim(resource.RLIMIT_NOFILE, int(nofile))
    lim(resource.RLIMIT_CORE, 0)
    if nproc is not None:
        lim(resource.RLIMIT_NPROC, int(nproc))



def bubblewrap_path() -> str | None:
    """bwrap, when installed. Not used by default: it execs a fresh interpreter per sandbox, which is the
    start-up cost the pre-forked runners exist to avoid; the layers above give the same guarantees."""
    return shutil.which("bwrap")


def _try_in_child(fn) -> str | None:
    """Run ``fn`` in a forked child; None when it succeeded, else the reason. Called only from sandbox
    processes (the judge/zygote), never from a caller that may hold CUDA."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fn()
            msg = b""
        except BaseException as exc:  # noqa: BLE001 - any failure is the probe's answer
            msg = f"{type(exc).__name__}: {exc}".encode()[:500] or b"failed"
        os.write(w, msg or b"")
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    out = b"".join(chunks).decode(errors="replace")
    return out or None


def _check_seccomp_blocks():
    seccomp.install()
    import socket

    try:
        os.kill(-1, 0)  # signal 0: a permission check only, harmless even if the filter were absent
    except PermissionError:
        pass
    else:
        raise OSError("kill(-1, 0) was not blocked")
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except PermissionError:
        pass
    else:
        raise OSError("an AF_INET socket was not blocked")


def _check_pid_namespace(use_userns: bool):
    if use_userns:
        enter_user_namespace()
    unshare(CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if os.getpid() == 1 else 3)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError("child was not pid 1 of the new namespace")


def probe() -> dict:
    """Which layers work here, each tried in a throw-away child: ``{layer: None (works) or reason}`` plus
    ``landlock_abi``, ``uid`` and ``bwrap``."""
    report: dict = {"uid": os.getuid(), "arch": ARCH, "bwrap": bubblewrap_path()}
    report["userns"] = _try_in_child(enter_user_namespace)
    report["pidns"] = _try_in_child(lambda: _check_pid_namespace(report["userns"] is None))
    report["netns"] = _try_in_child(lambda: (enter_user_namespace() if report["userns"] is None else None,
                                             unshare(CLONE_NEWNET)))
    report["seccomp"] = _try_in_child(_check_seccomp_blocks) if seccomp.supported() else f"no filter for {ARCH}"
    abi = landlock.kernel_abi()
    report["landlock_abi"] = abi
    report["landlock"] = None if abi >= 1 else "Landlock not available on this kernel (or disabled)"
    return report
