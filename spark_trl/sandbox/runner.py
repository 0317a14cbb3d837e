"""The untrusted side: a runner isolates itself, executes setup + program, then only answers requests.

A runner is a fresh child of the zygote (see ``zygote.py``), one per program. It never sees a test: the judge
asks it to call an object with these arguments, get an attribute, iterate, ... and gets plain data back (see
``wire.py``); anything else stays here behind a handle. Whatever it writes means nothing unless it is a valid
reply to the judge's request.
"""

from __future__ import annotations

import builtins
import os
import signal
import socket
import sys
import traceback
import types

from . import isolation, landlock, libc, seccomp, wire

ERROR_TAIL = 2000  # characters of a traceback that cross back


def tail(text: str) -> str:
    return text[-ERROR_TAIL:]


def _format(exc: BaseException) -> str:
    return tail("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


class _Handles:
    """Objects the judge refers to by number (``to_id``) or by global name (``resolve``)."""

    def __init__(self, namespace: dict):
        self.namespace = namespace
        self.objects: dict[int, object] = {}
        self.ids: dict[int, int] = {}

    def to_id(self, obj) -> int:
        key = id(obj)
        hid = self.ids.get(key)
        if hid is None or self.objects.get(hid) is not obj:
            hid = len(self.objects) + 1
            self.objects[hid] = obj
            self.ids[key] = hid
        return hid

    def resolve(self, ref):
        if type(ref) is str:
            try:
                return self.namespace[ref]
            except KeyError:
                raise NameError(f"name {ref!r} is not defined") from None
        return self.objects[ref]


PROGRAM_MODULE = "__program__"


def _program_namespace() -> dict:
    """The program runs as an imported module, not as ``__main__``: its ``if __name__ == "__main__":`` demo (an
    ``input()``, prints, ``sys.exit``) does not run, as under the tests' own ``import``/``exec``; registered in
    ``sys.modules`` so that pickle, dataclasses and typing find the module of the program's classes."""
    module = types.ModuleType(PROGRAM_MODULE)
    module.__builtins__ = builtins
    sys.modules[PROGRAM_MODULE] = module
    return module.__dict__


def serve(sock: socket.socket, setup: str, code: str) -> None:
    """The runner's whole life after isolation: exec setup + program, report the load, answer requests."""
    namespace = _program_namespace()
    handles = _Handles(namespace)

    def send(message, on_other=handles.to_id, known=None):
        wire.send_frame(sock, wire.encode(message, on_other, known=known))

    def reply(value, mutations, known):
        try:
            send(("ok", value, mutations), known=known)
        except (wire.Unencodable, RecursionError, ValueError, OverflowError):
            send(("ok", handles.to_id(value), mutations), known=known)

    try:
        exec(compile(setup, "<setup>", "exec", dont_inherit=True), namespace)
        exec(compile(code, "<program>", "exec", dont_inherit=True), namespace)
        # One-way: the judge has already queued its first request behind this (no round trip spent on it).
        send(("ready",))
    except BaseException as exc:  # noqa: BLE001 - the program's failure is the answer
        send(("loaderr", type(exc).__name__, _format(exc)))
        return
    while True:
        received: list = []  # the request's mutable containers, numbered as the judge numbered them
        try:
            request = wire.decode(wire.recv_frame(sock, None), handles.resolve, refs=received, number=True)
        except wire.Closed:
            return
        known = {id(obj): n for n, obj in enumerate(received)}
        try:
            before = _contents(received, handles, known)
            value = _answer(request, handles)
            # What the call changed in place, wherever the container sat in the arguments, goes back with the
            # result; the result refers to the request's containers by number (identity survives).
            after = _contents(received, handles, known)
            reply(value, [(n, blob) for n, blob in enumerate(after) if blob is not None and blob != before[n]], known)
        except BaseException as exc:  # noqa: BLE001 - sent back as the program's runtime error
            send(("err", type(exc).__name__, _format(exc)))


def _contents(containers: list, handles: _Handles, known: dict) -> list:
    """Each container's contents, encoded (inner containers of the request as references); None where the
    program put something that cannot be encoded."""
    out = []
    for obj in containers:
        try:
            out.append(wire.encode(obj, handles.to_id, known=known, contents=True))
        except (wire.Unencodable, RecursionError, ValueError, OverflowError):
            out.append(None)
    return out


def _answer(request, handles: _Handles):
    op, target = request[0], handles.resolve(request[1])
    if op == "call":
        return target(*request[2], **request[3])
    if op == "getattr":
        return getattr(target, request[2])
    if op == "iter":
        return list(target)
    if op == "len":
        return len(target)
    if op == "bool":
        return bool(target)
    if op == "str":
        return str(target)
    if op == "getitem":
        return target[request[2]]
    if op == "contains":
        return request[2] in target
    if op == "eq":  # two of the program's own objects: its own __eq__ decides, as it would anywhere
        return bool(target == request[2])
    if op == "ne":
        return bool(target != request[2])
    raise ValueError(f"unknown op {op!r}")


def _receive_program(sock: socket.socket) -> tuple[str, str]:
    message = wire.decode(wire.recv_frame(sock, None), handles_refused)
    if type(message) is not tuple or len(message) != 3 or message[0] != "load":
        raise wire.WireError("expected the program")
    return message[1], message[2]


def handles_refused(ref):
    raise wire.WireError("no handle expected here")


def start(sock: socket.socket, cfg: dict, work_dir: str, ruleset_fd: int | None) -> None:
    """In the zygote's fresh child: isolate, read the program from the judge, serve. Never returns."""
    try:
        os.setsid()
        isolation.set_parent_death_signal()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        keep = sorted({sock.fileno()} | ({ruleset_fd} if ruleset_fd is not None else set()))
        low = 3
        for fd in keep:  # close every inherited fd except ours (close_range under the hood)
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 16)
        os.chdir(work_dir)
        os.environ.clear()
        os.environ.update(isolation.scrubbed_env(work_dir))
        isolation.set_limits(cfg["memory_mb"], cfg["cpu_seconds"], nproc=32 if cfg["userns"] else None)
        libc.drop_capabilities()  # all of them in the user namespace it shares with the zygote, or as root
        if ruleset_fd is not None:
            landlock.restrict(ruleset_fd)
            os.close(ruleset_fd)
        if cfg["seccomp"]:
            seccomp.install()
        setup, code = _receive_program(sock)
        serve(sock, setup, code)
    except BaseException:  # noqa: BLE001
        pass
    os._exit(0)
