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


def unshare(flags: int) -> None:
    """unshare(2) through libc (os.unshare only exists from Python 3.12)."""
    check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")
