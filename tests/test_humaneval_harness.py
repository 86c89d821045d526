"""The HumanEval benchmark's harness: what program a reply stands for, and how it is judged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs each solution in a subprocess

_SPEC = importlib.util.spec_from_file_location(
    "humaneval_bench", Path(__file__).resolve().parent.parent / "benchmarks" / "humaneval.py")
humaneval = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(humaneval)

PROBLEM = {
    "task_id": "Test/0",
    "entry_point": "add_all",
    "prompt": ('from typing import List\n\n\ndef helper(x: int) -> int:\n    return x\n\n\n'
               'def add_all(xs: List[int]) -> int:\n    """Sum of xs.\n    >>> add_all([1, 2])\n'
               '    3\n    """\n'),
    "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
}


def test_a_chat_reply_with_the_whole_function_runs_after_the_prompts_helpers():
    reply = ("Here it is:\n```python\ndef add_all(xs: List[int]) -> int:\n"
             "    return sum(helper(x) for x in xs)\n```\nIt sums the list.")
    assert humaneval.run_tests(PROBLEM, reply, "chat") == (True, "passed")


def test_a_chat_block_without_the_function_is_read_as_its_body():
    reply = "```python\n    return sum(xs)\n```"
    assert humaneval.run_tests(PROBLEM, reply, "chat") == (True, "passed")


def test_a_wrong_or_endless_solution_fails_with_the_reason(monkeypatch):
    wrong = "```python\ndef add_all(xs):\n    return len(xs)\n```"
    passed, detail = humaneval.run_tests(PROBLEM, wrong, "chat")
    assert not passed and detail.startswith("AssertionError")
    monkeypatch.setattr(humaneval, "TEST_TIMEOUT_S", 1.0)
    endless = "```python\ndef add_all(xs):\n    while True:\n        pass\n```"
    assert humaneval.run_tests(PROBLEM, endless, "chat") == (False, "timeout")


def test_a_text_completion_keeps_only_the_functions_body():
    completion = "    return sum(xs)\n\nprint(add_all([1]))\nassert False\n"
    assert humaneval.run_tests(PROBLEM, completion) == (True, "passed")
