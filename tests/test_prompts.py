"""Code extraction from realistic completions, and the study's prompt wording."""

import pytest

from spark_trl.prompts import build_messages, extract_code, mbpp_user_prompt, signature_of


@pytest.mark.parametrize("completion, expected", [
    ("```python\ndef f(x):\n    return x\n```", "def f(x):\n    return x"),
    ("```py\ndef f(x):\n    return x\n```\n", "def f(x):\n    return x"),
    ("Sure! Here is the function:\n```\ndef f(x):\n    return x\n```\nThis returns x.", "def f(x):\n    return x"),
    # unterminated fence (generation hit the token cap)
    ("```python\ndef f(x):\n    return x", "def f(x):\n    return x"),
    # unfenced with prose before and after
    ("Here is the code:\ndef f(x):\n    return x\n\nThis function returns its input.", "def f(x):\n    return x"),
    # imports kept
    ("import math\ndef f(x):\n    return math.sqrt(x)", "import math\ndef f(x):\n    return math.sqrt(x)"),
])
def test_extract_code(completion, expected):
    assert extract_code(completion, "f") == expected


def test_extract_prefers_block_defining_entry_point():
    completion = ("First a helper:\n```python\ndef helper(y):\n    return y\n```\nNow the answer:\n"
                  "```python\ndef solve(x):\n    return helper(x)\n```\nExample:\n```python\nprint(solve(1))\n```")
    assert extract_code(completion, "solve") == "def solve(x):\n    return helper(x)"
    assert extract_code(completion) == "def helper(y):\n    return y"


def test_extract_skips_non_python_blocks():
    completion = "```bash\npip install numpy\n```\n```python\ndef f():\n    return 1\n```"
    assert extract_code(completion, "f") == "def f():\n    return 1"


def test_extract_bad_input():
    with pytest.raises(TypeError, match="completion must be a str"):
        extract_code(None)
    junk = "x" * 2_000_000 + "\x00\ufffd"
    assert isinstance(extract_code(junk), str)


def test_signature_nested_parens_and_multiline():
    code = "def helper():\n    pass\n\ndef g(a, b=(1, (2, 3)),\n      c=dict(x=1)) -> int:\n    return 1\n"
    assert signature_of(code, "g") == "def g(a, b=(1, (2, 3)), c=dict(x=1)) -> int:"
    assert signature_of(code, "missing") is None
    assert signature_of("def broken(:", "broken") is None


def test_prompt_wording():
    msgs = build_messages(mbpp_user_prompt("def f(x):", "Do it."))
    assert msgs[0]["content"] == "You are an expert Python programmer. Return only correct Python code."
    assert msgs[1]["content"].endswith('\n\ndef f(x):\n    """Do it."""\n')


def test_extract_keeps_module_level_code_before_first_def():
    completion = "Here is my solution:\nNO_OF_CHARS = 256\ndef f(s):\n    return NO_OF_CHARS\n\nIt returns 256."
    assert extract_code(completion, "f") == "NO_OF_CHARS = 256\ndef f(s):\n    return NO_OF_CHARS"


def test_extract_does_not_repair_a_trailing_broken_def():
    completion = "def f(x):\n    return x\n\ndef g(:\n    pass"
    code = extract_code(completion, "f")
    with pytest.raises(SyntaxError):
        compile(code, "<c>", "exec")


def test_extract_unfenced_program_before_a_stray_closing_fence():
    # SmolLM2's habit when told "no markdown": the program, a closing fence, then an example in a fence.
    completion = ('def triple(n):\n    """Return three times a number."""\n    return n * 3\n```\n\n'
                  "Your code should pass the following assertion:\n```python\nassert triple(5) == 15\n```")
    assert extract_code(completion, "triple") == 'def triple(n):\n    """Return three times a number."""\n    return n * 3'
    # A fenced block that defines the entry point still wins over text before it.
    fenced = "def triple(n):\n    return 0\n```python\ndef triple(n):\n    return 3 * n\n```"
    assert extract_code(fenced, "triple") == "def triple(n):\n    return 3 * n"
    # Prose before a fence is not a program.
    prose = "Here is triple:\n```text\nno code\n```"
    assert "Here is" not in extract_code(prose + "\n```python\ndef triple(n):\n    return n * 3\n```", "triple")
