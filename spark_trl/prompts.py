"""Prompts of the SPARK-Code study and code extraction from model completions.

The wording is the study's, verbatim, so that a model trained or evaluated with spark-trl sees exactly what
the published adapters saw. What differs from the study is documented where it differs:

* the MBPP signature is the one of the function the tests call (the study took the first ``def`` of the
  reference code, a helper the tests never call in 11 problems);
* extraction prefers the fenced block that defines the entry point when a completion holds several.
"""

from __future__ import annotations

import ast
import re

SYSTEM_PROMPT = "You are an expert Python programmer. Return only correct Python code."
REVIEWER_SYSTEM_PROMPT = "You are an expert Python programmer and code reviewer."
INSTRUCTION = (
    "Write the complete Python function satisfying this signature and docstring. "
    "Return only Python code, no markdown, no explanation."
)


def mbpp_user_prompt(signature: str, text: str) -> str:
    """The study's MBPP user message: instruction, signature, and the task text as a docstring.

    Example:
    ```python
    >>> print(mbpp_user_prompt("def add(a, b):", "Add two numbers."))
    Write the complete Python function satisfying this signature and docstring. Return only Python code, no markdown, no explanation.
    <BLANKLINE>
    def add(a, b):
        \"\"\"Add two numbers.\"\"\"
    <BLANKLINE>
    ```
    """
    return f'{INSTRUCTION}\n\n{signature}\n    """{text}"""\n'


def humaneval_user_prompt(prompt: str) -> str:
    """The study's HumanEval user message: the same instruction followed by HumanEval's code prompt."""
    return f"{INSTRUCTION}\n\n{prompt}"


def build_messages(user_prompt: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Conversational messages as TRL expects them in a ``prompt`` column."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user_prompt})
    return messages


def signature_of(code: str, name: str) -> str | None:
    """The ``def`` line of the top-level function ``name`` in ``code``, rebuilt from the AST.

    Rebuilding from the AST (rather than a regex over the source) survives nested parentheses, defaults
    holding calls, annotations and signatures split over several lines. Returns None when ``code`` does not
    parse or defines no such function.
    """
    try:
        tree = ast.parse(code, "<dataset>")
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
            return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"
    return None


# ``` or ~~~ fences with an optional language tag; the closing fence may be missing (truncated output).
_FENCE = re.compile(r"^[ \t]*(```|~~~)[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*\1[ \t]*$|\Z)", re.M | re.S)
_PY_TAGS = {"python", "py", "python3", "py3", ""}
_MAX_TRAILING_LINES = 64
# A line opening a Python statement: keyword, decorator, comment, assignment or call.
_PY_START = re.compile(r"^(?:(?:def|class|async|import|from|if|elif|else|for|while|try|except|finally|with|return|"
                       r"assert|raise|print)\b|[@#]|[A-Za-z_][\w.]*\s*(?:=|\(|\[))")
_CODE_START = re.compile(r"^(?:def |async def |class |from |import |@)", re.M)


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", code, re.M) is not None


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """Extract the Python program from a model completion.

    Handles ```python / ```py / bare fences, several blocks (the first that defines ``entry_point`` wins,
    else the first Python block), unterminated fences (truncated generations) and prose before or after
    unfenced code.

    Example:
    ```python
    >>> extract_code("Here you go:\\n```python\\ndef f(x):\\n    return x\\n```\\nHope it helps!")
    'def f(x):\\n    return x'
    ```
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    matches = list(_FENCE.finditer(completion))
    blocks = [(m.group(2).lower(), m.group(3)) for m in matches]
    python_blocks = [body for tag, body in blocks if tag in _PY_TAGS]
    if python_blocks:
        if entry_point:
            for body in python_blocks:
                if _defines(body, entry_point):
                    return body.strip("\n").rstrip()
            # Code written first, unfenced, then a stray closing fence and prose or an example (small models do
            # this when told "no markdown"): the program is the text before the first fence.
            head = completion[:matches[0].start()]
            if _defines(head, entry_point):
                return _strip_prose(head)
        return python_blocks[0].strip("\n").rstrip()
    return _strip_prose(completion)


def _compiles(code: str) -> bool:
    try:
        compile(code, "<completion>", "exec")
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return False
    return True


def _is_prose(line: str) -> bool:
    """A line that can only be prose: not indented, not a statement on its own, not opening a Python block."""
    stripped = line.strip()
    if not stripped or line[0] in " \t" or _PY_START.match(stripped):
        return False
    return not _compiles(stripped)


def _strip_prose(text: str) -> str:
    """Unfenced output: drop the prose before and after the program, nothing else.

    Lines before the first ``def``/``class``/``import`` are kept when they are code (``N = 256``), dropped when
    they are prose; trailing lines are cut only at a prose line, so a program followed by a broken ``def``
    still fails to compile, as it should, instead of being silently repaired.
    """
    if _compiles(text):
        return text.strip()
    match = _CODE_START.search(text)
    if match is None:
        return text.strip()
    head, body = text[:match.start()].splitlines(), text[match.start():].split("\n")
    while head and not _is_prose(head[-1]):  # code (and blank) lines just above the first def
        body.insert(0, head.pop())
    # Bounded search, so that megabytes of junk cost a bounded number of compiles.
    for end in range(len(body), max(0, len(body) - _MAX_TRAILING_LINES), -1):
        if end < len(body) and not _is_prose(body[end]):
            continue
        candidate = "\n".join(body[:end]).rstrip()
        if _compiles(candidate):
            return candidate.strip("\n")
    return "\n".join(body).strip()
