"""The runner's seccomp BPF filter: which syscalls an untrusted program may not make, and with which arguments.

Per class (each denied with EPERM unless said otherwise; x86_64 and aarch64):

* network: sockets other than ``AF_UNIX``; ``connect``/``bind``/``listen``/``accept``; ``sendmsg``/``sendmmsg``
  always (the filter cannot read the address inside a message) and ``sendto`` with an address (a host's pathname
  or abstract Unix socket is reachable without ``connect``);
* other processes: ``ptrace``, ``process_vm_readv/writev``, ``kcmp``, ``pidfd_*``, ``process_madvise``; signals
  only to itself (``kill`` also to its own group); scheduling, priority, I/O priority and resource limits
  (``setpriority``, ``sched_set*``, ``ioprio_set``, ``prlimit64``) only of itself: a runner cannot renice or
  limit the zygote that later runners inherit from;
* process creation and replacement: fork/vfork, ``clone`` without ``CLONE_THREAD`` (``clone3`` gets ENOSYS so
  that libc falls back to ``clone``), ``execve(at)``, new sessions/groups;
* namespaces and mounts: ``unshare``/``setns``, ``mount``/``umount2``/``pivot_root``/``chroot`` and the new mount
  API (the runner shares a user namespace with the zygote);
* file metadata, which Landlock does not cover: ``chmod``/``chown``/``utime`` families and extended attributes
  (those with ENOTSUP, so that ``shutil.copy2`` skips them as on a file system without xattrs): no host file
  changes, and no xattr carries data from one completion to the next;
* channels between processes that outlive a runner: System V IPC, POSIX message queues, keyrings;
* kernel attack surface: ``bpf``, ``perf_event_open``, ``userfaultfd``, io_uring, ``personality``,
  ``open_by_handle_at``.

A syscall of another ABI (32-bit on x86_64, x32) kills the process: the numbers would not mean the same.
"""

from __future__ import annotations

import ctypes
import os
import struct

from .libc import ARCH, CLONE_THREAD, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, prctl

SECCOMP_MODE_FILTER = 2
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
AF_UNIX, PRIO_PROCESS, IOPRIO_WHO_PROCESS = 1, 0, 1

# Syscall numbers per architecture (asm/unistd.h). None: the syscall does not exist there.
_X86_64 = dict(
    socket=41, connect=42, accept=43, sendto=44, sendmsg=46, bind=49, listen=50, accept4=288, sendmmsg=307,
    ptrace=101, process_vm_readv=310, process_vm_writev=311, kcmp=312, process_madvise=440, process_mrelease=448,
    pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, get_robust_list=274, migrate_pages=256, move_pages=279,
    kill=62, tkill=200, tgkill=234, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297,
    setpriority=141, sched_setparam=142, sched_setscheduler=144, sched_setaffinity=203, sched_setattr=314,
    prlimit64=302, ioprio_set=251,
    fork=57, vfork=58, clone=56, clone3=435, execve=59, execveat=322, setsid=112, setpgid=109,
    unshare=272, setns=308, mount=165, umount2=166, pivot_root=155, chroot=161, open_tree=428, move_mount=429,
    fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442,
    chmod=90, fchmod=91, fchmodat=268, fchmodat2=452, chown=92, fchown=93, lchown=94, fchownat=260,
    utime=132, utimes=235, futimesat=261, utimensat=280,
    setxattr=188, lsetxattr=189, fsetxattr=190, getxattr=191, lgetxattr=192, fgetxattr=193, listxattr=194,
    llistxattr=195, flistxattr=196, removexattr=197, lremovexattr=198, fremovexattr=199, setxattrat=463,
    getxattrat=464, listxattrat=465, removexattrat=466,
    shmget=29, shmat=30, shmctl=31, shmdt=67, semget=64, semop=65, semctl=66, semtimedop=220, msgget=68,
    msgsnd=69, msgrcv=70, msgctl=71, mq_open=240, mq_unlink=241, mq_timedsend=242, mq_timedreceive=243,
    mq_notify=244, mq_getsetattr=245, keyctl=250, add_key=248, request_key=249,
    bpf=321, perf_event_open=298, userfaultfd=323, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
    personality=135, name_to_handle_at=303, open_by_handle_at=304,
)
_AARCH64 = dict(
    socket=198, connect=203, accept=202, sendto=206, sendmsg=211, bind=200, listen=201, accept4=242, sendmmsg=269,
    ptrace=117, process_vm_readv=270, process_vm_writev=271, kcmp=272, process_madvise=440, process_mrelease=448,
    pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, get_robust_list=100, migrate_pages=238, move_pages=239,
    kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240,
    setpriority=140, sched_setparam=118, sched_setscheduler=119, sched_setaffinity=122, sched_setattr=274,
    prlimit64=261, ioprio_set=30,
    fork=None, vfork=None, clone=220, clone3=435, execve=221, execveat=281, setsid=157, setpgid=154,
    unshare=97, setns=268, mount=40, umount2=39, pivot_root=41, chroot=51, open_tree=428, move_mount=429,
    fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442,
    chmod=None, fchmod=52, fchmodat=53, fchmodat2=452, chown=None, fchown=55, lchown=None, fchownat=54,
    utime=None, utimes=None, futimesat=None, utimensat=88,
    setxattr=5, lsetxattr=6, fsetxattr=7, getxattr=8, lgetxattr=9, fgetxattr=10, listxattr=11, llistxattr=12,
    flistxattr=13, removexattr=14, lremovexattr=15, fremovexattr=16, setxattrat=463, getxattrat=464,
    listxattrat=465, removexattrat=466,
    shmget=194, shmat=196, shmctl=195, shmdt=197, semget=190, semop=193, semctl=191, semtimedop=192, msgget=186,
    msgsnd=189, msgrcv=188, msgctl=187, mq_open=180, mq_unlink=181, mq_timedsend=182, mq_timedreceive=183,
    mq_notify=184, mq_getsetattr=185, keyctl=219, add_key=217, request_key=218,
    bpf=280, perf_event_open=241, userfaultfd=282, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
    personality=92, name_to_handle_at=264, open_by_handle_at=265,
)
_NR = {"x86_64": _X86_64, "aarch64": _AARCH64}

DENIED = (
    "connect", "accept", "bind", "listen", "accept4", "sendmsg", "sendmmsg",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "process_madvise", "process_mrelease",
    "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "get_robust_list", "migrate_pages", "move_pages", "tkill",
    "fork", "vfork", "execve", "execveat", "setsid", "setpgid",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "utime", "utimes", "futimesat", "utimensat",
    "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop", "msgget", "msgsnd", "msgrcv",
    "msgctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "personality", "name_to_handle_at", "open_by_handle_at",
)
NO_XATTRS = ("setxattr", "lsetxattr", "fsetxattr", "getxattr", "lgetxattr", "fgetxattr", "listxattr",
             "llistxattr", "flistxattr", "removexattr", "lremovexattr", "fremovexattr", "setxattrat",
             "getxattrat", "listxattrat", "removexattrat")
# Syscalls allowed only on the runner itself: (name, index of the pid argument, (index, value) that must hold).
SELF_ONLY = (
    ("kill", 0, None), ("tgkill", 0, None), ("rt_sigqueueinfo", 0, None), ("rt_tgsigqueueinfo", 0, None),
    ("setpriority", 1, (0, PRIO_PROCESS)), ("ioprio_set", 1, (0, IOPRIO_WHO_PROCESS)),
    ("sched_setparam", 0, None), ("sched_setscheduler", 0, None), ("sched_setaffinity", 0, None),
    ("sched_setattr", 0, None), ("prlimit64", 0, None),
)

_LD_W_ABS, _JEQ, _JSET, _JGE, _JA, _RET = 0x20, 0x15, 0x45, 0x35, 0x05, 0x06
_ALLOW, _KILL = 0x7FFF0000, 0x80000000
_EPERM, _ENOSYS, _ENOTSUP = 1, 38, 95
_OWN_PID = object()  # placeholder in the program, patched per runner


def _errno(errno: int) -> int:
    return 0x00050000 | errno


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def supported() -> bool:
    return ARCH in _NR


def _arg(i: int, high: bool = False) -> int:
    """Offset of args[i] in struct seccomp_data (low 32 bits first on little-endian machines)."""
    return 16 + 8 * i + (4 if high else 0)


class _Assembler:
    """Classic BPF with labels: ``jump(k, if_equal, otherwise)`` where each target is a label or None (the next
    instruction). Every block ends in its own returns, so jumps stay short (BPF offsets are 8-bit)."""

    def __init__(self):
        self.code: list[list] = []
        self.labels: dict[str, int] = {}

    def load(self, offset: int):
        self.code.append([_LD_W_ABS, None, None, offset])

    def jump(self, k, if_equal=None, otherwise=None, op=_JEQ):
        self.code.append([op, if_equal, otherwise, k])

    def ret(self, value: int):
        self.code.append([_RET, None, None, value])

    def always(self, target: str):
        """Unconditional jump (its 32-bit offset is resolved like the others')."""
        self.code.append([_JA, None, None, target])

    def label(self, name: str):
        self.labels[name] = len(self.code)

    def assemble(self) -> tuple[list[list], list[int]]:
        """Instructions with resolved offsets, and the indices whose k is the runner's own pid."""
        out, own = [], []
        for i, (op, jt, jf, k) in enumerate(self.code):
            if op == _JA:
                k = self.labels[k] - i - 1
            offsets = [0 if t is None else self.labels[t] - i - 1 for t in (jt, jf)]
            if not all(0 <= o <= 255 for o in offsets):
                raise ValueError(f"seccomp jump out of range at {i}")
            if k is _OWN_PID:
                own.append(i)
                k = 0
            out.append([op, offsets[0], offsets[1], k])
        return out, own


def _build() -> tuple[list[list], list[int]]:
    nr = _NR[ARCH]
    asm = _Assembler()
    block = iter(range(1 << 30))

    def syscall_block(name):
        """Start a block for syscall ``name``; returns the label after it (None: it does not exist here)."""
        if nr.get(name) is None:
            return None
        end = f"end{next(block)}"
        asm.load(0)
        asm.jump(nr[name], None, end)
        return end

    # Wrong architecture (e.g. 32-bit syscalls on x86_64) -> kill: the numbers below would not mean the same.
    asm.load(4)
    asm.jump(AUDIT_ARCH[ARCH], "arch_ok", None)
    asm.ret(_KILL)
    asm.label("arch_ok")
    if ARCH == "x86_64":  # the x32 ABI's syscalls carry bit 30
        asm.load(0)
        asm.jump(0x40000000, None, "abi_ok", op=_JGE)
        asm.ret(_KILL)
        asm.label("abi_ok")
    # Denied outright: one comparison each, jumping to a shared return (a short program installs faster).
    asm.load(0)
    for names, target in ((DENIED, "eperm"), (NO_XATTRS, "enotsup")):
        for name in names:
            if nr.get(name) is not None:
                asm.jump(nr[name], target, None)
    asm.always("checked")
    asm.label("eperm")
    asm.ret(_errno(_EPERM))
    asm.label("enotsup")
    asm.ret(_errno(_ENOTSUP))
    asm.label("checked")
    # clone3 passes its flags in memory the filter cannot read: ENOSYS makes libc fall back to clone.
    end = syscall_block("clone3")
    asm.ret(_errno(_ENOSYS))
    asm.label(end)
    # clone: threads only (CLONE_THREAD set).
    end = syscall_block("clone")
    asm.load(_arg(0))
    asm.jump(CLONE_THREAD, "thread", None, op=_JSET)
    asm.ret(_errno(_EPERM))
    asm.label("thread")
    asm.ret(_ALLOW)
    asm.label(end)
    # socket(domain, ...): AF_UNIX only.
    end = syscall_block("socket")
    asm.load(_arg(0))
    asm.jump(AF_UNIX, "unix", None)
    asm.ret(_errno(_EPERM))
    asm.label("unix")
    asm.ret(_ALLOW)
    asm.label(end)
    # sendto(fd, buf, len, flags, dest_addr, addrlen): only without an address (a connected socket).
    end = syscall_block("sendto")
    asm.load(_arg(4))
    asm.jump(0, None, "addressed")
    asm.load(_arg(4, high=True))
    asm.jump(0, None, "addressed")
    asm.ret(_ALLOW)
    asm.label("addressed")
    asm.ret(_errno(_EPERM))
    asm.label(end)
    # Syscalls on a pid: only 0 (itself) or its own pid; kill also its own group (0).
    for name, pid_arg, condition in SELF_ONLY:
        end = syscall_block(name)
        if end is None:
            continue
        deny, allow = f"deny{next(block)}", f"allow{next(block)}"
        if condition is not None:
            index, value = condition
            asm.load(_arg(index))
            asm.jump(value, None, deny)
        asm.load(_arg(pid_arg))
        asm.jump(0, allow, None)
        asm.jump(_OWN_PID, allow, None)
        asm.label(deny)
        asm.ret(_errno(_EPERM))
        asm.label(allow)
        asm.ret(_ALLOW)
        asm.label(end)
    asm.ret(_ALLOW)
    return asm.assemble()


_INSTRUCTION = struct.Struct("=HBBI")


class _Prepared:
    """The assembled filter in a ctypes buffer, and where the runner's pid goes: made once in the zygote, before
    it forks runners, so that a runner pays a few patches and two prctl calls (ctypes objects made after the
    fork cost hundreds of microseconds of copy-on-write faults)."""

    def __init__(self):
        code, own = _build()
        raw = b"".join(_INSTRUCTION.pack(*ins) for ins in code)
        self.buffer = ctypes.create_string_buffer(raw, len(raw))
        self.fprog = _SockFprog(len(code), ctypes.cast(self.buffer, ctypes.POINTER(_SockFilter)))
        self.address = ctypes.addressof(self.fprog)
        self.pid_offsets = [i * _INSTRUCTION.size + 4 for i in own]

    def patch(self, own_pid: int) -> None:
        for offset in self.pid_offsets:
            struct.pack_into("=I", self.buffer, offset, own_pid & 0xFFFFFFFF)


_PREPARED: _Prepared | None = None


def prepare() -> _Prepared:
    """Assemble the filter now (in the zygote, once)."""
    global _PREPARED
    if _PREPARED is None:
        _PREPARED = _Prepared()
    return _PREPARED



def install(own_pid: int | None = None) -> None:
    """Install the runner's seccomp filter (irreversible; sets no_new_privs first)."""
    if not supported():
        raise OSError(f"seccomp filter not written for architecture {ARCH}")
    prepared = prepare()
    prepared.patch(os.getpid() if own_pid is None else own_pid)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, prepared.address)
