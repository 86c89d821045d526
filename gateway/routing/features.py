"""What a difficulty estimator sees of a request: its text and a few named features.

Features are cheap (a handful of precompiled regular expressions over at most
:data:`SCAN_CHARS` characters of the last user turn) and domain-general: they describe the
*shape* of a task — how long it is, whether it carries numbers, formulas, code, several
steps, answer options, a long passage — rather than its topic, so that an estimator fitted
on one set of subjects or tasks transfers to others.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from backends import GenerationRequest

#: Pattern features look at most this many characters (head and tail) of the last turn,
#: so scoring stays well under a millisecond for any prompt size.
SCAN_CHARS = 4096

_WORD = re.compile(r"[A-Za-z][A-Za-z']+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_MATH_SYMBOL = re.compile(r"[=^√∑∫≤≥±×÷]")
_MATH_MARKS = ("\\frac", "\\sqrt", "**")
_ARITHMETIC = re.compile(r"\d ?[-+*/] ?\d")
_LOGIC_SYMBOL = re.compile(r"[⊃∨∧≡→↔¬∀∃∈⊆∪∩]")
_UNIT = re.compile(r"\d ?(?:kg|g|mg|m|cm|mm|km|s|ms|K|J|kJ|W|V|A|N|Pa|mol|L|mL|Hz|eV|°C|°F|%|\$)\b")
_OPTION = re.compile(r"^\s*\(?[A-Ja-j][.)]\s+(.*)$", re.M)
#: Several independent claims to judge: "Statement 1 | ...", "Scenario 2 | ...".
_CLAIM = re.compile(r"\b(?:Statement|Scenario|Claim|Premise|Case) ?\d ?\|")
_PAIR_OPTION = re.compile(r"^[\w ]{1,12}, ?[\w ]{1,12}$")  # "True, False", "Wrong, Not wrong"
_ROMAN = re.compile(r"(?m)^\s*(?:I{1,3}|IV)[.)] ")

# Word sets (lower case) looked up once per word: cheaper than one regex pass each.
_MATH_WORDS = {"log", "sin", "cos", "tan", "lim", "mod", "integral", "derivative", "equation",
               "matrix", "polynomial", "probability", "variance"}
_CODE_WORDS = {"def", "return", "import", "function", "class", "lambda", "const", "void",
               "printf", "println", "select", "struct", "async", "await", "elif"}
_STEP_WORDS = {"first", "then", "next", "finally", "afterwards", "prove", "derive", "justify",
               "compare", "analyze", "analyse", "evaluate", "design", "implement", "optimize",
               "optimise", "step", "steps"}
_COMPUTE_WORDS = {"calculate", "compute", "solve", "determine", "estimate", "find"}
_COMPUTE_PHRASES = ("how many", "how much", "what is the value", "what is the probability",
                    "expected value", "show that", "explain why", "step by step")
_NEGATION_WORDS = {"not", "except", "least", "incorrect", "false"}
#: Emphasised negations ("NOT", "EXCEPT") and plain "incorrect"/"false", case as written.
_NEGATION_MARKS = ("NOT ", "EXCEPT", "LEAST", "incorrect", "false", "False")
_LOGIC_WORDS = {"iff", "valid", "invalid", "entails", "entailment", "implies", "tautology",
                "tautologous", "contradiction", "premise", "premises", "conclusion"}
_PHRASE_STARTS = {p.split()[0] for p in _COMPUTE_PHRASES}
_CODE_MARKS = ("```", "{", "};", "=>", "#include", "):\n", "();")
_OPEN_ENDED = {"why", "how", "explain", "describe", "write"}
_LOOKUP = {"what", "which", "who", "when", "where", "is", "are", "does", "do", "can", "list", "give",
           "translate", "summarise", "summarize", "should"}


@dataclass(frozen=True, slots=True)
class RequestText:
    """The parts of a request that difficulty depends on."""

    #: The last user turn (or the completion prompt).
    last: str
    #: Earlier turns' text, joined (context the model must take into account).
    context_chars: int
    #: User turns so far (1 for a completion).
    turns: int
    has_system: bool
    max_tokens: int | None

    @classmethod
    def of(cls, request: GenerationRequest) -> RequestText:
        if request.messages is None:  # a fill-in-the-middle suffix is context
            return cls(request.prompt or "", len(request.suffix or ""), 1, False,
                       request.max_tokens)
        last, context, turns, system = "", 0, 0, False
        for m in request.messages:
            role, content = m["role"], m["content"] or ""
            if role == "user":
                turns += 1
                context += len(last)
                last = content
            else:
                context += len(content)
                system = system or role in ("system", "developer")
        return cls(last, context, max(turns, 1), system, request.max_tokens)


def _scan(text: str) -> str:
    if len(text) <= SCAN_CHARS:
        return text
    half = SCAN_CHARS // 2
    return text[:half] + "\n" + text[-half:]


@functools.cache
def _inverse_log1p(full: float) -> float:
    return 1.0 / math.log1p(full)


def _log_scaled(value: float, full: float) -> float:
    """log1p(value) / log1p(full), clipped to [0, 1]: 0 at 0, 1 at ``full`` and beyond."""
    if value <= 0:
        return 0.0
    return min(math.log1p(value) * _inverse_log1p(full), 1.0)


def _overlap(options: list[str]) -> float:
    """Mean word overlap (Jaccard) between answer options: near-identical distractors."""
    sets = [set(o.lower().split()) for o in options[:6]]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:] if a or b]
    return sum(len(a & b) / len(a | b) for a, b in pairs) / len(pairs) if pairs else 0.0


def extract(text: RequestText) -> dict[str, float]:
    """Named features of a request, each in [0, 1]."""
    body = _scan(text.last)
    lower = body.lower()
    lowered = _WORD.findall(lower)
    n_words = max(len(lowered), 1)
    vocabulary = set(lowered)  # distinct words: set operations run in C
    steps = len(vocabulary & _STEP_WORDS)
    compute = len(vocabulary & _COMPUTE_WORDS)
    code = len(vocabulary & _CODE_WORDS)
    logic = len(vocabulary & _LOGIC_WORDS)
    maths = len(vocabulary & _MATH_WORDS)
    negation = sum(body.count(w) for w in _NEGATION_MARKS) if vocabulary & _NEGATION_WORDS else 0
    lengths = list(map(len, lowered))
    long_words = sum(1 for n in lengths if n >= 10)
    chars = sum(lengths)
    if vocabulary & _PHRASE_STARTS:
        compute += sum(lower.count(p) for p in _COMPUTE_PHRASES)
    code += sum(body.count(m) for m in _CODE_MARKS)
    options = _OPTION.findall(body)
    option_chars = [len(o) for o in options]
    numbers = _NUMBER.findall(body)
    years = sum(1 for n in numbers if len(n) == 4 and n.isdigit() and 1800 <= int(n) <= 2049)
    stem = body[:body.find(options[0])] if options else body
    lead = lowered[0] if lowered else ""
    claims = len(_CLAIM.findall(body)) if "|" in body else 0
    pairs = sum(1 for o in options if _PAIR_OPTION.match(o.strip()))
    return {
        "length": _log_scaled(len(text.last), 8000),
        "stem_length": _log_scaled(len(stem), 4000),
        "context": _log_scaled(text.context_chars, 16000),
        "turns": min((text.turns - 1) / 4, 1.0),
        "lines": _log_scaled(body.count("\n"), 100),
        "word_length": min(chars / n_words / 10, 1.0),
        "long_words": long_words / n_words,
        "numbers": _log_scaled(len(numbers), 40),
        "number_density": min(len(numbers) / n_words, 1.0),
        "math": _log_scaled(len(_MATH_SYMBOL.findall(body)) + maths
                            + sum(body.count(m) for m in _MATH_MARKS)
                            + (len(_ARITHMETIC.findall(body)) if numbers else 0), 20),
        "units": _log_scaled(len(_UNIT.findall(body)), 10) if numbers else 0.0,
        "code": _log_scaled(code, 10),
        "steps": _log_scaled(steps, 6),
        "compute": _log_scaled(compute, 3),
        "negation": min(negation, 2) / 2,
        "statements": min(claims + len(_ROMAN.findall(body)), 4) / 4,
        "compound": min(claims + pairs, 6) / 6,
        "logic": _log_scaled(len(_LOGIC_SYMBOL.findall(body)) + logic, 8),
        "years": min(years, 3) / 3,
        "options": min(len(options), 10) / 10,
        "option_length": _log_scaled(sum(option_chars) / len(options), 300) if options else 0.0,
        "option_overlap": _overlap(options),
        "option_spread": (min((max(option_chars) - min(option_chars)) / (max(option_chars) + 1), 1.0)
                          if options else 0.0),
        "numeric_options": (sum(bool(_NUMBER.search(o)) for o in options) / len(options)
                            if options else 0.0),
        "open_ended": 1.0 if lead in _OPEN_ENDED else 0.0,
        "lookup": 1.0 if lead in _LOOKUP else 0.0,
        "questions": min(body.count("?"), 5) / 5,
        "system": 1.0 if text.has_system else 0.0,
        "max_tokens": _log_scaled(text.max_tokens or 0, 4096),
    }
