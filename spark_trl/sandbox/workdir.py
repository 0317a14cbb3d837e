"""The judges' work dirs on the host: where they live, emptying one, measuring one, removing dead judges' ones.

Removal is iterative, relative to one open directory at a time (a chain thousands of levels deep is longer than
PATH_MAX and deeper than Python's recursion limit), bounded in entries and seconds, and never raises: a tree
it cannot finish is left for a later attempt (the judge that owns it retires, see ``judge.py``).
"""

from __future__ import annotations

import os
import stat
import time

ROOT_PREFIX = "spark-trl-judge-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def default_tmp_dir() -> str:
    """A tmpfs when there is one: creating and removing a runner's files there costs microseconds, not the
    milliseconds of a journaled disk."""
    import tempfile

    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


class _Budget:
    def __init__(self, max_entries: int, max_seconds: float):
        self.entries, self.deadline = max_entries, time.monotonic() + max_seconds

    def spend(self) -> bool:
        self.entries -= 1
        return self.entries >= 0 and (self.entries % 256 or time.monotonic() < self.deadline)


def _retry_writable(fn, dir_fd: int) -> None:
    """``fn()``; after a PermissionError, make the directory ours to write (the runner may have chmod-ed it,
    where seccomp is off) and try once more."""
    try:
        fn()
    except PermissionError:
        os.chmod(dir_fd, 0o700)
        fn()


def _open_dir(name: str, dir_fd: int) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        os.chmod(name, 0o700, dir_fd=dir_fd)  # a directory (scandir said so), not a link
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def empty(path: str, max_entries: int = 1_000_000, max_seconds: float = 10.0) -> bool:
    """Remove everything below ``path`` (never ``path`` itself, never through a symlink). True when done."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return not os.path.lexists(path)
    budget = _Budget(max_entries, max_seconds)
    descended: list[str] = []  # names from path down to the current directory
    try:
        while True:
            subdir = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if not budget.spend():
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        subdir = subdir or entry.name
                    else:
                        _retry_writable(lambda: _unlink(entry.name, fd), fd)
            if subdir is not None:  # go down; the directory's other subdirectories wait for the way back
                child = _open_dir(subdir, fd)
                os.close(fd)
                fd = child
                descended.append(subdir)
                continue
            if not descended:
                return True
            name = descended.pop()  # this directory is empty: go up and remove it
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            _retry_writable(lambda: os.rmdir(name, dir_fd=fd), fd)
    except OSError:
        return False
    finally:
        os.close(fd)


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def remove_tree(path: str, max_entries: int = 1_000_000, max_seconds: float = 10.0) -> bool:
    """Remove ``path`` and everything below it, within the budget. True when it is gone."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
            return True
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not empty(path, max_entries, max_seconds):
        return False
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def exceeds(path: str, max_bytes: int, max_files: int) -> bool:
    """More than ``max_bytes`` or ``max_files`` under ``path`` (the work dir without the private view, where no
    tmpfs caps it). Stops counting at the caps: the walk costs at most ``max_files`` entries."""
    total, files = 0, 0
    todo = [path]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                for entry in entries:
                    files += 1
                    if files > max_files:
                        return True
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if total > max_bytes:
                        return True
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
        except OSError:
            continue
    return False


def remove_stale_roots(tmp_dir: str) -> None:
    """Work dirs of judges that were SIGKILLed together with their caller (nobody left to remove them):
    ``spark-trl-judge-<pid>-*`` of ours whose judge pid is gone. Never raises."""
    try:
        entries = os.listdir(tmp_dir)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(ROOT_PREFIX):
            continue
        pid = entry[len(ROOT_PREFIX):].split("-", 1)[0]
        path = os.path.join(tmp_dir, entry)
        try:
            if not pid.isdigit() or os.lstat(path).st_uid != os.getuid() or os.path.exists(f"/proc/{pid}"):
                continue
        except OSError:
            continue
        remove_tree(path)
