"""Run generated programs against trusted tests: a pool of trusted judges, one untrusted runner per program.

Three kinds of process, one module each:

* the **caller** (``executor.py``; the trainer, may hold CUDA) never forks: it starts the judges with
  ``subprocess`` and exchanges pickled jobs and results with them over pipes;
* **judges** (``judge.py``), one per CPU: fresh interpreters without site-packages that compile the program,
  run every test themselves and decide what happened; each forks a **zygote** (``zygote.py``) before its
  first job, a clean copy that never receives a test;
* **runners** (``runner.py``), forked by the zygote per program: they apply the isolation layers
  (``isolation.py``, ``seccomp.py``, ``landlock.py``), execute the program and then only answer the judge's
  requests in plain data (``wire.py``).

A test passes only when the judge ran it to the end without an exception; exit codes, stdout and anything else
the runner writes mean nothing. docs/sandbox.md has the threat model and what each layer stops.

Example:
```python
>>> from spark_trl.sandbox import Executor, Job
>>> with Executor(workers=2) as ex:
...     [o.status.value for o in ex.run([Job("def f(x):\\n    return 2 * x", ["assert f(2) == 4"])])]
['passed']
```
"""

from .executor import Executor, Job, get_executor
from .wire import WireError, decode, encode

__all__ = ["Executor", "Job", "WireError", "decode", "encode", "get_executor"]
