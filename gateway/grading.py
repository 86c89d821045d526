"""Grading a model's answer automatically, for routing labels (``joulegate router collect``).

Three graders, each ``(reply, expected) -> bool``:

- :func:`letter_ok` — a multiple-choice answer: the letter the reply chose (:func:`chosen_letter`)
  is the expected one;
- :func:`numeric_ok` — a maths word problem: the reply's final number (:func:`final_number`:
  a ``\\boxed{}`` or ``####`` answer, else "the answer is ...", else the last number) equals
  the expected one, read the same way (commas, currency, units and percent signs ignored);
- :func:`code_ok` — code: the program (a chat reply's first code block, or the completion)
  followed by the tests exits 0 in a fresh interpreter within a timeout.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

LETTERS = "ABCDEFGHIJ"

# "answer is (B)", "Answer: B", "the correct option is B."
_ANSWER_IS = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:|=)?\s*(?:option\s*)?[\(\[]?\s*([A-J])\s*[\)\].:,]?(?![A-Za-z])",
    re.IGNORECASE)
# a reply that starts with the letter: "B", "(B)", "B. paralysis", "B)"
_LEADING = re.compile(r"^\W{0,3}([A-J])(?:[\)\].:,]|\s|$)")


def chosen_letter(reply: str, letters: str = LETTERS[:4]) -> str | None:
    """The option a multiple-choice reply chose, or None when it names none."""
    text = reply.strip()
    for match in _ANSWER_IS.finditer(text):
        letter = match.group(1).upper()
        if letter in letters:
            return letter
    lead = _LEADING.match(text)
    if lead and lead.group(1) in letters:
        return lead.group(1)
    alone = re.search(rf"(?<![A-Za-z'])([{letters}])(?![A-Za-z'])", text)
    return alone.group(1) if alone else None


def letter_ok(reply: str, expected: str) -> bool:
    return chosen_letter(reply) == expected.strip().upper()


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*([^\n]*)")
_FINAL = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)


def parse_number(text: str) -> Fraction | None:
    """The first number in ``text`` as an exact value: ``$1,234.50`` → 1234.5, ``-3``,
    ``25%`` → 25, ``3/4``; None when there is none."""
    match = re.search(_NUMBER, text.replace("\u2212", "-"))
    if match is None:
        return None
    raw = match.group(0).replace(",", "")
    try:
        return Fraction(raw)
    except (ValueError, ZeroDivisionError):
        return None


def final_number(reply: str) -> Fraction | None:
    """The final answer of a worked solution: the last ``\\boxed{}``, else the text after
    the last ``####``, else after the last "answer is", else the last number anywhere."""
    for pattern in (_BOXED, _HASHES):
        for candidate in reversed(pattern.findall(reply)):
            value = parse_number(candidate)
            if value is not None:
                return value
    said = _FINAL.split(reply)
    if len(said) > 1:  # the line after the last "answer is"
        value = parse_number(said[-1].lstrip(" :").split("\n", 1)[0])
        if value is not None:
            return value
    numbers = re.findall(_NUMBER, reply.replace("\u2212", "-"))
    for raw in reversed(numbers):
        value = parse_number(raw)
        if value is not None:
            return value
    return None


def numeric_ok(reply: str, expected: str) -> bool:
    want, got = parse_number(expected), final_number(reply)
    return want is not None and got is not None and want == got


def code_block(reply: str) -> str:
    """A chat reply's first fenced code block (the whole reply when it has none)."""
    match = re.search(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|\Z)", reply, re.DOTALL)
    return match.group(1) if match else reply


def run_program(program: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """Run ``program`` in a fresh, isolated interpreter in a scratch folder: (passed, detail),
    passed when it exits 0 within ``timeout_s``; detail is the last line of its error."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.py"
        path.write_text(program)
        try:
            proc = subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, capture_output=True,
                                  text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return False, "timeout"
    if proc.returncode == 0:
        return True, "passed"
    return False, (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]


def code_ok(reply: str, tests: str, prelude: str = "", timeout_s: float = 10.0) -> bool:
    """The reply's code (its first code block), after ``prelude`` (imports, helpers), passes
    ``tests`` (statements that raise on failure)."""
    program = f"{prelude}\n{code_block(reply)}\n\n{tests}\n"
    return run_program(program, timeout_s)[0]
