"""Moved to ``spark_trl.sandbox.isolation`` (with ``seccomp`` and ``landlock`` beside it); kept importable."""

from .sandbox.isolation import *  # noqa: F401,F403
from .sandbox.isolation import probe  # noqa: F401
