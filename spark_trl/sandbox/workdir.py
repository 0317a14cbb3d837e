"""The judges' work dirs: where they live, emptying one after a runner, and removing those of dead judges."""

from __future__ import annotations

import os
import shutil

ROOT_PREFIX = "spark-trl-judge-"


def default_tmp_dir() -> str:
    """A tmpfs when there is one: creating and removing a runner's files there costs microseconds, not the
    milliseconds of a journaled disk."""
    import tempfile

    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


def empty(root: str) -> None:
    """Remove everything a runner wrote in ``root`` (it may write anywhere below it)."""
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, onerror=_force_remove)
            else:
                os.unlink(path)
        except OSError:
            pass


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


def _force_remove(func, path, exc_info):
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass


def remove_stale_roots(tmp_dir: str) -> None:
    """Work dirs of judges that were SIGKILLed together with their caller (nobody left to remove them):
    ``spark-trl-judge-<pid>-*`` of ours whose judge pid is gone."""
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
            if not pid.isdigit() or os.stat(path).st_uid != os.getuid() or os.path.exists(f"/proc/{pid}"):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
