"""Where each name a test uses comes from: the trusted side, or the program under test.

A test runs in the judge, in a namespace of builtins + the test setup. A name the test looks up as a global and
defines neither itself nor through the setup (a *free* name) is bound by ``bind_free_names``:

1. the job's entry point: the program's object, even when it shadows a builtin (MBPP 126 tests a ``sum``);
2. a builtin: the judge's own, never the program's (``def len(x): return 3`` must not rig the test's
   comparisons). Without an entry point, a program name shadowing a builtin is bound when the test uses no
   other program name (the only way to tell what the test is about);
3. a standard-library module: the judge's own import (MBPP 596 calls ``sys.getsizeof`` without importing
   ``sys``: a program defining its own ``sys`` must not supply the test's expected value);
4. anything else is what the problem needs from the program (a class the test instantiates, a helper it
   calls): the program's object, looked up by name when used (a missing one is the program's ``NameError``).
"""

from __future__ import annotations

import builtins
import dis
import importlib
import sys

_STORE_OPS = (dis.opmap["STORE_NAME"], dis.opmap["STORE_GLOBAL"], dis.opmap["EXTENDED_ARG"])
_LOAD_NAME, _LOAD_GLOBAL = dis.opmap["LOAD_NAME"], dis.opmap["LOAD_GLOBAL"]
_GLOBAL_SHIFT = 1 if sys.version_info >= (3, 11) else 0  # LOAD_GLOBAL's arg is namei << 1 | push-null since 3.11
_STDLIB_MODULES = frozenset(getattr(sys, "stdlib_module_names", ())) | frozenset(sys.builtin_module_names)


def stored_names(code) -> set[str]:
    """Names a program binds at top level (def, class, import, assignment) or declares ``global``: a scan of
    the raw bytecode for STORE_NAME/STORE_GLOBAL (``dis.get_instructions`` is ten times slower; this runs once
    per program)."""
    store_name, store_global, extended = _STORE_OPS
    names = set()
    raw, co_names, ext = code.co_code, code.co_names, 0
    for i in range(0, len(raw) - 1, 2):
        op, arg = raw[i], raw[i + 1] | ext
        ext = (arg << 8) if op == extended else 0
        if (op == store_name or op == store_global) and arg < len(co_names):
            names.add(co_names[arg])
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names |= stored_names(const)
    return names


def free_globals(code) -> frozenset[str]:
    """Names ``code`` (a test; nested functions and comprehensions included) looks up as globals and does not
    bind itself: a raw scan for LOAD_NAME/LOAD_GLOBAL (inline caches read as opcode 0, which is skipped)."""
    extended = _STORE_OPS[2]
    loads: set[str] = set()
    todo = [code]
    while todo:
        c = todo.pop()
        raw, co_names, ext = c.co_code, c.co_names, 0
        for i in range(0, len(raw) - 1, 2):
            op, arg = raw[i], raw[i + 1] | ext
            ext = (arg << 8) if op == extended else 0
            if op == _LOAD_NAME and arg < len(co_names):
                loads.add(co_names[arg])
            elif op == _LOAD_GLOBAL and arg >> _GLOBAL_SHIFT < len(co_names):
                loads.add(co_names[arg >> _GLOBAL_SHIFT])
        todo += [k for k in c.co_consts if hasattr(k, "co_code")]
    return frozenset(loads - stored_names(code))


def is_stdlib_module(name: str) -> bool:
    return name in _STDLIB_MODULES


def bind_free_names(namespace: dict, test_free: frozenset[str], entry_point: str, remote, program_stores) -> None:
    """Bind each free name of a test in ``namespace`` (builtins + setup already executed) by the rules above.

    ``remote(name)`` makes the program's object of that name; ``program_stores()`` returns the names the
    program binds (needed only for the builtin-shadowing rule of jobs without an entry point)."""
    wanted = [n for n in test_free if n not in namespace]
    from_program = []
    shadowing = []
    for name in wanted:
        if name == entry_point:
            namespace[name] = remote(name)
        elif hasattr(builtins, name):
            shadowing.append(name)
        elif is_stdlib_module(name):
            try:
                namespace[name] = importlib.import_module(name)
            except ImportError:
                pass  # not on this platform: a NameError of the test, like any undefined name
        else:
            from_program.append(name)
            namespace[name] = remote(name)
    if shadowing and not entry_point:
        defined = program_stores()
        if not any(n in defined for n in from_program):
            for name in shadowing:
                if name in defined:
                    namespace[name] = remote(name)
