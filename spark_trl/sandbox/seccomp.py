"""The runner's seccomp BPF filter: which syscalls an untrusted program may not make.

Denied with EPERM (x86_64 and aarch64): sockets other than ``AF_UNIX``, ``ptrace``, ``process_vm_readv/writev``,
process creation (fork/vfork, ``clone`` without ``CLONE_THREAD``; ``clone3`` gets ENOSYS so that libc falls back
to ``clone``), ``execve(at)``, new sessions/groups, namespaces and mounts, ``pidfd_*``, keyrings, ``bpf``,
``perf_event_open``, ``userfaultfd``, io_uring, ``personality``; signals only to itself (``kill`` also to its own
group). A syscall of another ABI (32-bit on x86_64, x32) kills the process: the numbers would not mean the same.
"""

from __future__ import annotations

import ctypes
import os
import struct

from .libc import ARCH, CLONE_THREAD, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, prctl

SECCOMP_MODE_FILTER = 2
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# Syscall numbers per architecture (asm/unistd.h). None: the syscall does not exist there.
_NR = {
    "x86_64": dict(socket=41, ptrace=101, process_vm_readv=310, process_vm_writev=311, kill=62, tkill=200,
                   tgkill=234, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, fork=57, vfork=58, clone=56,
                   clone3=435, execve=59, execveat=322, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438,
                   unshare=272, setns=308, mount=165, setsid=112, setpgid=109, keyctl=250, bpf=321,
                   perf_event_open=298, userfaultfd=323, io_uring_setup=425, io_uring_enter=426,
                   io_uring_register=427, personality=135),
    "aarch64": dict(socket=198, ptrace=117, process_vm_readv=270, process_vm_writev=271, kill=129, tkill=130,
                    tgkill=131, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, fork=None, vfork=None, clone=220,
                    clone3=435, execve=221, execveat=281, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438,
                    unshare=97, setns=268, mount=40, setsid=157, setpgid=154, keyctl=219, bpf=280,
                    perf_event_open=241, userfaultfd=282, io_uring_setup=425, io_uring_enter=426,
                    io_uring_register=427, personality=92),
}
_BPF_LD_W_ABS, _BPF_JEQ, _BPF_JSET, _BPF_JGE, _BPF_RET = 0x20, 0x15, 0x45, 0x35, 0x06
_RET_ALLOW, _RET_KILL = 0x7FFF0000, 0x80000000
_EPERM, _ENOSYS = 1, 38


def _ret_errno(errno: int) -> int:
    return 0x00050000 | errno


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def supported() -> bool:
    return ARCH in _NR


def program(own_pid: int) -> list[tuple[int, int, int, int]]:
    """The filter, as (code, jt, jf, k). seccomp_data: nr at offset 0, arch at 4, args[i] at 16 + 8 i (low
    32 bits first on little-endian machines; every argument compared here is a 32-bit int)."""
    nr = _NR[ARCH]
    deny = _ret_errno(_EPERM)
    prog: list[tuple[int, int, int, int]] = []

    def ld(off):
        prog.append((_BPF_LD_W_ABS, 0, 0, off))

    def ret(k):
        prog.append((_BPF_RET, 0, 0, k))

    # Wrong architecture (e.g. 32-bit syscalls on x86_64) -> kill: the numbers below would not mean the same.
    ld(4)
    prog.append((_BPF_JEQ, 1, 0, AUDIT_ARCH[ARCH]))
    ret(_RET_KILL)
    ld(0)
    if ARCH == "x86_64":  # the x32 ABI's syscalls carry bit 30
        prog.append((_BPF_JGE, 0, 1, 0x40000000))
        ret(_RET_KILL)
    # Syscalls denied outright.
    for name in ("ptrace", "process_vm_readv", "process_vm_writev", "tkill", "fork", "vfork", "execve",
                 "execveat", "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "unshare", "setns", "mount",
                 "setsid", "setpgid", "keyctl", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
                 "io_uring_enter", "io_uring_register", "personality"):
        if nr[name] is not None:
            prog.append((_BPF_JEQ, 0, 1, nr[name]))
            ret(deny)
    # clone3 passes its flags in memory the filter cannot read: ENOSYS makes libc fall back to clone.
    prog.append((_BPF_JEQ, 0, 1, nr["clone3"]))
    ret(_ret_errno(_ENOSYS))
    # clone: threads only (CLONE_THREAD set); fork-like clones denied.
    prog.append((_BPF_JEQ, 0, 4, nr["clone"]))
    ld(16)
    prog.append((_BPF_JSET, 1, 0, CLONE_THREAD))
    ret(deny)
    ret(_RET_ALLOW)
    # socket(domain, ...): AF_UNIX (1) only.
    ld(0)
    prog.append((_BPF_JEQ, 0, 4, nr["socket"]))
    ld(16)
    prog.append((_BPF_JEQ, 1, 0, 1))
    ret(deny)
    ret(_RET_ALLOW)
    # Signals: kill(pid, ...) only to itself or its own group (0); tgkill/rt_*sigqueueinfo only to itself.
    for name, allowed in (("kill", (own_pid, 0)), ("tgkill", (own_pid,)), ("rt_sigqueueinfo", (own_pid,)),
                          ("rt_tgsigqueueinfo", (own_pid,))):
        ld(0)
        n = len(allowed)
        prog.append((_BPF_JEQ, 0, 2 + n + 1, nr[name]))
        ld(16)
        for i, pid in enumerate(allowed):
            # jump to ALLOW (after the deny) when equal
            prog.append((_BPF_JEQ, n - i, 0, pid & 0xFFFFFFFF))
        ret(deny)
        ret(_RET_ALLOW)
    ret(_RET_ALLOW)
    return prog


def install(own_pid: int | None = None) -> None:
    """Install the runner's seccomp filter (irreversible; sets no_new_privs first)."""
    if not supported():
        raise OSError(f"seccomp filter not written for architecture {ARCH}")
    pid = os.getpid() if own_pid is None else own_pid
    prog = program(pid)
    # One pack of the whole program (a ctypes object per instruction costs ~100 us per runner).
    raw = struct.pack("=" + "HBBI" * len(prog), *[v for ins in prog for v in ins])
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SockFprog(len(prog), ctypes.cast(buf, ctypes.POINTER(_SockFilter)))
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.cast(ctypes.byref(fprog), ctypes.c_void_p).value)
