"""Process-level isolation of the untrusted runner, and the probe of which layers this machine offers.

Applied in the runner (a process forked by the zygote, see ``zygote.py``) before any generated code runs:
session of its own, parent-death signal, work dir as cwd, scrubbed environment, stdio on /dev/null, resource
limits; the zygote itself enters a user namespace and becomes pid 1 of a pid namespace holding every runner.
The zygote also builds a private view of the file system (``enter_private_view``): a read-only root holding only
what Python needs, and a size-capped tmpfs as the runners' work dir, replaced after every runner
(``fresh_work_dir``). The filters live beside this file: ``seccomp.py`` (syscalls) and ``landlock.py`` (files,
TCP, signals).

``probe()`` reports which layers work, each tried once in a throw-away child.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal

from . import landlock, libc, seccomp
from .libc import (ARCH, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER, PR_SET_DUMPABLE, PR_SET_PDEATHSIG,
                   prctl, unshare)


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


# ----------------------------------------------------------------------------- private file system view

WORK = "work"  # the runners' work dir: <judge root>/work
_ST_TO_MS = {os.ST_NOSUID: libc.MS_NOSUID, os.ST_NODEV: libc.MS_NODEV, os.ST_NOEXEC: libc.MS_NOEXEC,
             os.ST_NOATIME: libc.MS_NOATIME, os.ST_NODIRATIME: libc.MS_NODIRATIME, os.ST_RELATIME: libc.MS_RELATIME}


def visible_paths() -> tuple[list[str], list[str]]:
    """(paths a runner sees, paths hidden under them): what Landlock lets it read (``landlock.python_read_paths``),
    with the standard library bound as one directory and its site-/dist-packages covered."""
    stdlib = os.path.dirname(os.__file__)
    paths = [stdlib] + [p for p in landlock.python_read_paths() if not p.startswith(stdlib + os.sep)]
    hidden = [os.path.join(stdlib, d) for d in ("site-packages", "dist-packages")
              if os.path.isdir(os.path.join(stdlib, d))]
    return paths + ["/dev/null"], hidden


def _symlinks_on_the_way(path: str) -> dict[str, str]:
    """The symlinks met resolving ``path`` (e.g. /lib -> usr/lib), each at a location whose parents are real
    directories, so that recreating them in the view never writes through a link."""
    links, cur = {}, "/"
    for part in path.strip("/").split("/"):
        nxt = os.path.join(cur, part)
        if os.path.islink(nxt):
            links[nxt] = os.readlink(nxt)
            nxt = os.path.realpath(nxt)
        cur = nxt
    return links


def _bind_read_only(source: str, target: str) -> None:
    libc.mount(source, target, None, libc.MS_BIND | libc.MS_REC)
    # A bind mount in a user namespace keeps the flags its source had locked: remount with them, plus read-only.
    locked = sum(ms for st, ms in _ST_TO_MS.items() if os.statvfs(source).f_flag & st)
    libc.mount(None, target, None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | locked)


def enter_private_view(root: str, visible: list[str], hidden: list[str]) -> None:
    """A mount namespace whose file system is a read-only tmpfs holding only ``visible`` (bound read-only at their
    own paths, symlinks on the way recreated), ``hidden`` covered by empty read-only directories, and the empty
    directory ``<root>/work`` for ``fresh_work_dir``. Needs a user namespace of our own (``enter_user_namespace``).

    Host files outside it cannot be named at all: no stat, chmod, utime, xattr or Unix-socket connect on them,
    whatever Landlock's ABI covers."""
    unshare(CLONE_NEWNS)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)  # nothing we mount propagates to the host
    skeleton = root  # the new root: a tmpfs over the judge's (empty) dir, in our namespace only
    libc.mount("tmpfs", skeleton, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "size=1m,nr_inodes=1024,mode=0755")
    links: dict[str, str] = {}
    bound: set[str] = set()
    for path in visible:
        links.update(_symlinks_on_the_way(path))
        real = os.path.realpath(path)
        if real in bound:  # e.g. libpython3.11.so, a link to libpython3.11.so.1.0
            continue
        bound.add(real)
        target = skeleton + real
        if os.path.isdir(real):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        _bind_read_only(real, target)
    for path in hidden:
        libc.mount("tmpfs", skeleton + os.path.realpath(path), "tmpfs",
                   libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV, "size=4k,nr_inodes=1")
    for link, target in sorted(links.items()):  # after the binds: a link is never a parent of a mount point
        if not os.path.lexists(skeleton + link):
            os.makedirs(os.path.dirname(skeleton + link), exist_ok=True)
            os.symlink(target, skeleton + link)
    os.makedirs(skeleton + os.path.join(root, WORK))
    os.mkdir(skeleton + "/.old-root")
    libc.pivot_root(skeleton, skeleton + "/.old-root")
    os.chdir("/")
    libc.umount("/.old-root")
    os.rmdir("/.old-root")
    libc.mount(None, "/", None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV)


def fresh_work_dir(path: str, disk_mb: int, max_files: int) -> None:
    """Replace the tmpfs at ``path`` with an empty one of ``disk_mb`` MiB and ``max_files`` inodes: whatever the
    last runner wrote there (files, a directory chain thousands deep) goes with the old one, in O(1) here."""
    try:
        libc.umount(path)
    except OSError:
        pass  # nothing mounted yet
    libc.mount("tmpfs", path, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV,
               f"size={int(disk_mb)}m,nr_inodes={int(max_files)},mode=0700")


# ------------------------------------------------------------------------------------- environment

_ENV_KEEP = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}


def scrubbed_env(home: str | None = None) -> dict[str, str]:
    """A minimal environment: nothing from the caller's (no tokens, keys, credentials, proxies, paths)."""
    env = dict(_ENV_KEEP)
    env["PYTHONHASHSEED"] = "0"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if home:
        env["HOME"] = env["TMPDIR"] = home
    return env


def limit_address_space(memory_mb: int) -> None:
    """RLIMIT_AS of this process (soft only: the judge is trusted, the bound is against its inputs)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    value = int(memory_mb) * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(resource.RLIMIT_AS, (value, hard))


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


def _check_private_view(scratch: str):
    """The whole view as the zygote builds it, on a scratch dir; then a host file must be out of sight."""
    enter_user_namespace()
    visible, hidden = visible_paths()
    enter_private_view(scratch, visible, hidden)
    fresh_work_dir(os.path.join(scratch, WORK), 1, 16)
    if os.path.exists("/proc/self/status"):  # read by enter_user_namespace's caller a moment ago
        raise OSError("/proc is still visible")


def probe(scratch: str | None = None) -> dict:
    """Which layers work here, each tried in a throw-away child: ``{layer: None (works) or reason}`` plus
    ``landlock_abi``, ``uid`` and ``bwrap``. ``scratch``: an empty dir for the private view's probe."""
    report: dict = {"uid": os.getuid(), "arch": ARCH, "bwrap": bubblewrap_path()}
    report["userns"] = _try_in_child(enter_user_namespace)
    report["pidns"] = _try_in_child(lambda: _check_pid_namespace(report["userns"] is None))
    if report["userns"] is not None:
        report["mountns"] = "needs a user namespace"
    elif scratch is None:
        report["mountns"] = "not probed"
    else:
        report["mountns"] = _try_in_child(lambda: _check_private_view(scratch))
    report["netns"] = _try_in_child(lambda: (enter_user_namespace() if report["userns"] is None else None,
                                             unshare(CLONE_NEWNET)))
    report["seccomp"] = _try_in_child(_check_seccomp_blocks) if seccomp.supported() else f"no filter for {ARCH}"
    abi = landlock.kernel_abi()
    report["landlock_abi"] = abi
    report["landlock"] = None if abi >= 1 else "Landlock not available on this kernel (or disabled)"
    return report
