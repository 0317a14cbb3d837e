"""The few libc calls the isolation layers need, through ctypes (no third-party import: the sandbox's judge and
runner processes run an interpreter started with ``-S``, without site-packages)."""

from __future__ import annotations

import ctypes
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

ARCH = platform.machine()

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
CAPSET = {"x86_64": 126, "aarch64": 91}


def check(ret: int, what: str) -> int:
    """Raise ``OSError`` with errno for a negative libc return value."""
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def syscall(number: int, *args) -> int:
    """A raw syscall; the return value unchecked (callers use ``check``)."""
    return _libc.syscall(number, *args)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    args = [None if v is None else v.encode() for v in (source, target, fstype)]
    check(_libc.mount(*args, ctypes.c_ulong(flags), None if data is None else data.encode()),
          f"mount({source}, {target}, {fstype})")


def umount(target: str, flags: int = 2) -> None:
    """umount2(target, MNT_DETACH): the mount goes now, its file system once nothing uses it."""
    check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount({target})")


def pivot_root(new_root: str, put_old: str) -> None:
    check(_libc.syscall(PIVOT_ROOT[ARCH], new_root.encode(), put_old.encode()), "pivot_root")


# capset(2)'s arguments, made at import (in the zygote): ctypes objects made after a fork cost page copies.
_CAP_HEADER = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
_CAP_NONE = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero


def drop_capabilities() -> None:
    """capset(2) with empty effective, permitted and inheritable sets: the runner keeps no capability, also in
    the user namespace it shares with the zygote (where it would otherwise hold all of them) and as root."""
    check(_libc.syscall(CAPSET[ARCH], _CAP_HEADER, _CAP_NONE), "capset")


def unshare(flags: int) -> None:
    """unshare(2) through libc (os.unshare only exists from Python 3.12)."""
    check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")
