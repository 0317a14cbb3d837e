"""Landlock: what files an untrusted runner may read and write, and (ABI >= 4, >= 6) TCP and cross-domain
signals / abstract unix sockets.

A ruleset is built once (hundreds of rules) and applied per runner with one syscall (``restrict``).
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

from .libc import ARCH, PR_SET_NO_NEW_PRIVS, check, prctl, syscall

_SYS_LANDLOCK = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_REMOVE_DIR, LL_REMOVE_FILE, LL_MAKE_CHAR, LL_MAKE_DIR = 16, 32, 64, 128
LL_MAKE_REG, LL_MAKE_SOCK, LL_MAKE_FIFO, LL_MAKE_BLOCK, LL_MAKE_SYM = 256, 512, 1024, 2048, 4096
LL_REFER, LL_TRUNCATE, LL_IOCTL_DEV = 8192, 16384, 32768
LL_NET_BIND_TCP, LL_NET_CONNECT_TCP = 1, 2
LL_SCOPE_ABSTRACT_UNIX, LL_SCOPE_SIGNAL = 1, 2
_FILE_RIGHTS = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV


def kernel_abi() -> int:
    """The kernel's Landlock ABI version, 0 when unavailable."""
    if ARCH not in _SYS_LANDLOCK:
        return 0
    ret = syscall(_SYS_LANDLOCK[ARCH][0], None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return int(ret) if ret > 0 else 0


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # v1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= LL_REFER
    if abi >= 3:
        rights |= LL_TRUNCATE
    if abi >= 5:
        rights |= LL_IOCTL_DEV
    return rights


def python_read_paths() -> list[str]:
    """What the runner may read: every stdlib entry except site-/dist-packages, lib-dynload, libpython,
    system libraries and a few files the C library and the time module open."""
    stdlib = os.path.dirname(os.__file__)
    paths = [os.path.join(stdlib, e) for e in os.listdir(stdlib) if e not in ("site-packages", "dist-packages")]
    for p in sys.path:  # lib-dynload and the stdlib zip (may be outside stdlib, e.g. on Debian)
        if p.endswith("lib-dynload") or p.endswith(".zip"):
            paths.append(p)
    libdir = os.path.join(sys.base_prefix, "lib")
    if os.path.isdir(libdir):
        paths += [os.path.join(libdir, e) for e in os.listdir(libdir) if e.startswith("libpython")]
    paths += ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache", "/etc/localtime",
              "/usr/share/zoneinfo", "/dev/urandom", "/dev/zero"]
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


def ruleset(read_paths: list[str], write_paths: list[str], abi: int | None = None) -> int:
    """A Landlock ruleset fd allowing reads under ``read_paths`` and everything under ``write_paths``; TCP
    bind/connect (ABI >= 4) and signals / abstract unix sockets out of the domain (ABI >= 6) denied.
    Built once (hundreds of rules) and applied per runner with ``restrict``."""
    abi = kernel_abi() if abi is None else abi
    if abi < 1:
        raise OSError("Landlock is not available on this kernel")
    create, add, _ = _SYS_LANDLOCK[ARCH]
    attr = _RulesetAttr(_fs_rights(abi), LL_NET_BIND_TCP | LL_NET_CONNECT_TCP if abi >= 4 else 0,
                        LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    fd = check(syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
               "landlock_create_ruleset")
    all_rights = _fs_rights(abi)
    read = LL_READ_FILE | LL_READ_DIR | LL_EXECUTE
    try:
        for paths, rights in ((read_paths, read), (write_paths, all_rights)):
            for path in paths:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    is_dir = os.path.isdir(path)
                    allowed = rights if is_dir else rights & _FILE_RIGHTS
                    # struct landlock_path_beneath_attr is packed: u64 allowed_access, s32 parent_fd.
                    buf = ctypes.create_string_buffer(struct.pack("=Qi", allowed, pfd))
                    check(syscall(add, ctypes.c_int(fd), ctypes.c_int(1), buf, ctypes.c_uint32(0)),
                          f"landlock_add_rule({path})")
                finally:
                    os.close(pfd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def restrict(ruleset_fd: int) -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    check(syscall(_SYS_LANDLOCK[ARCH][2], ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)), "landlock_restrict_self")
