"""The automatic graders of `joulegate router collect` (:mod:`gateway.grading`)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from gateway import grading


@pytest.mark.unit
@pytest.mark.parametrize(("reply", "letter"), [
    ("B", "B"),
    (" C.", "C"),
    ("(D) paralysis of the facial muscles", "D"),
    ("A. paralysis of the facial muscles.", "A"),
    ("The answer is B.", "B"),
    ("The correct answer is (C)", "C"),
    ("Answer: D", "D"),
    ("I think the best option is A because it fits.", "A"),
    ("A good question. The answer is C.", "C"),
    ("Option B", "B"),
    ("", None),
    ("I don't know.", None),
])
def test_the_letter_a_reply_chose(reply, letter):
    assert grading.chosen_letter(reply) == letter


@pytest.mark.unit
def test_letter_grading():
    assert grading.letter_ok("B. loss of taste", "B")
    assert grading.letter_ok("the answer is c", "C")
    assert not grading.letter_ok("A", "B")
    assert not grading.letter_ok("no idea", "B")


@pytest.mark.unit
@pytest.mark.parametrize(("reply", "value"), [
    ("She makes 9 * 2 = $18 every day.\nThe answer is 18.", 18),
    ("The total is $1,234.50 in the end.", Fraction("1234.5")),
    ("So the temperature drops to -7 degrees.\nThe answer is -7", -7),
    ("3 + 4 = 7, then 7 * 2 = 14\n#### 14", 14),
    ("The final result is \\boxed{42}.", 42),
    ("It takes 3 hours and 30 minutes, i.e. 3.5 hours.\nThe answer is 3.5 hours", Fraction("3.5")),
    ("25% of 80 is 20, so the answer is 20%.", 20),
    ("The answer is: 1,000,000 dollars", 1_000_000),
    ("There are 5 apples and 3 pears, 8 fruits in all.", 8),
    ("no numbers here", None),
])
def test_the_final_number_of_a_worked_answer(reply, value):
    assert grading.final_number(reply) == (None if value is None else Fraction(value))


@pytest.mark.unit
def test_numeric_grading_ignores_commas_units_and_formatting():
    assert grading.numeric_ok("The answer is $1,234", "1234")
    assert grading.numeric_ok("The answer is 18.00", "18")
    assert grading.numeric_ok("so he has -3 left. The answer is -3", "-3")
    assert grading.numeric_ok("The answer is 0.5 km", "0.5")
    assert grading.numeric_ok("The answer is 70,000.", "70000")
    assert not grading.numeric_ok("The answer is 17", "18")
    assert not grading.numeric_ok("The answer is 18, wait no: the answer is 19", "18")
    assert not grading.numeric_ok("I cannot tell.", "18")


@pytest.mark.unit
def test_the_first_code_block_of_a_chat_reply():
    reply = "Here it is:\n```python\ndef f(x):\n    return x + 1\n```\nand a test:\n```\nf(1)\n```"
    assert grading.code_block(reply) == "def f(x):\n    return x + 1\n"
    assert grading.code_block("def g():\n    pass") == "def g():\n    pass"


@pytest.mark.e2e
def test_code_grading_runs_the_tests_in_a_fresh_interpreter():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    good = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    assert grading.code_ok(good, tests)
    assert not grading.code_ok(bad, tests)
    # A reply that is only the function's body completes the prelude's signature.
    assert grading.code_ok("    return a + b\n", tests, prelude="def add(a, b):\n")
    # A reply that never ends fails on the timeout; one that cannot import fails too.
    assert grading.run_program("while True:\n    pass\n", timeout_s=1.0) == (False, "timeout")
    passed, detail = grading.run_program("import no_such_module_here\n")
    assert not passed and "ModuleNotFoundError" in detail
