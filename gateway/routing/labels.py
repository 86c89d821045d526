"""Labelled routing data from every source, and the wordings a prompt is asked in.

A *source* is one labelled data set: a folder ``data/routing/<source>/`` holding CSV files
with (at least) the columns ``prompt,cheap_ok,strong_ok`` (``0``/``1``: whether the cheap and
the strong tier answered that prompt correctly), and optionally ``cheap_joules`` and
``strong_joules`` (what answering it cost on each tier), ``joules`` (one figure, the strong
tier's), ``cheap_answer_logprobs`` or ``cheap_logprobs`` (the cheap tier's answer's token
log-probabilities, space-separated, for the cascade) and ``format`` (how it was asked: ``completion`` for a text completion, ``chat`` for
a prompt already worded as a chat request; default ``bare``, a plain user message).
Beside the folders, :data:`PROMPT_SCORES` holds the cheap tier's own score of each prompt's text
(for the cascade's prompt signal), where one was measured.
``mmlu/`` is RouteLLM's format (one column per model, ``True``/``False``) and is read as
such: cheap = Mixtral-8x7B, strong = GPT-4. ``mt_bench/`` holds no labels and is skipped.

:func:`request_for` builds the request a prompt becomes in each :data:`FORMATS` wording, so
estimators can be checked for how much their scores move when the same task is asked
differently. Plain Python: no NumPy needed to read the data.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from backends import GenerationRequest

WEAK_COLUMN = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG_COLUMN = "gpt-4-1106-preview"
#: Folders under the data folder that hold no labels.
UNLABELLED = frozenset({"mt_bench"})

#: A source with fewer labelled prompts is neither trained on nor held out (a collection
#: still under way, say).
MIN_PROMPTS = 30
#: Beside the sources: per labelled prompt (:attr:`Example.key`), how likely the cheap tier
#: found its own text (``benchmarks/prompt_scores.py``, through the llama.cpp backend).
PROMPT_SCORES = "prompt-scores-small.csv"
#: The same for a sample of the prompts asked in the other wordings of :data:`FORMATS`
#: (``key,wording,mean_logprob``), for the prompt signal's wording spread.
WORDED_SCORES = "prompt-scores-small-wordings.csv"
#: The wordings every estimator is evaluated in (see :func:`request_for`).
FORMATS = ("bare", "system", "fewshot", "completion", "chat")

SYSTEM_PROMPT = "You are a helpful assistant. Answer accurately and concisely."
#: The chat wording of a code task (benchmarks/humaneval.py asks the local tiers this way).
CODE_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, "
                    "including its imports, in one ```python code block.")
TASK_INSTRUCTION = "Answer the following question. Think it through, then give the final answer."
#: Two fixed worked examples per kind of task, prepended for the ``fewshot`` wording.
FEW_SHOT = {
    "code": ("def add(a: int, b: int) -> int:\n    \"\"\"Return the sum of a and b.\"\"\"\n"
             "    return a + b\n\n"
             "def is_even(n: int) -> bool:\n    \"\"\"Return True if n is even.\"\"\"\n"
             "    return n % 2 == 0\n\n"),
    "text": ("Question: What is 3 + 4?\nAnswer: 7\n\n"
             "Question: Which planet is closest to the Sun?\nAnswer: Mercury\n\n"),
}


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled prompt."""

    subject: str
    prompt: str
    weak: bool
    strong: bool
    #: The data set it came from (its folder under the data folder).
    source: str = ""
    #: How the tiers were asked: ``bare`` (a user message), ``completion`` or ``chat``.
    format: str = "bare"
    weak_joules: float | None = None
    strong_joules: float | None = None
    #: The cheap tier's answer's log-probabilities, first token first (empty: not recorded),
    #: what a cascade's probe judges.
    cheap_logprobs: tuple[float, ...] = ()
    #: The cheap tier's mean log-probability of the prompt's own text as labelled (``None``:
    #: not scored), what the cascade's ``signal: prompt`` judges (:data:`PROMPT_SCORES`).
    prompt_logprob: float | None = None
    #: The same of the prompt asked in other wordings: ``(wording, mean log-probability)``
    #: (:data:`WORDED_SCORES`).
    worded_logprobs: tuple[tuple[str, float], ...] = ()

    @property
    def gain(self) -> float:
        """What sending the prompt to the strong tier gains: 1, 0 or -1 (strong right less
        cheap right); an oracle routes by it."""
        return float(self.strong) - float(self.weak)

    @property
    def key(self) -> str:
        """Names the prompt as labelled, across files: its source, format and text."""
        digest = hashlib.sha256(self.prompt.encode()).hexdigest()[:16]
        return f"{self.source}/{self.format}/{digest}"

    def prompt_logprob_in(self, wording: str) -> float | None:
        """:attr:`prompt_logprob` of the prompt asked in ``wording`` (``native``: as labelled);
        ``None``: not scored so."""
        if wording in ("native", self.format):
            return self.prompt_logprob
        return dict(self.worded_logprobs).get(wording)

    @property
    def needs_strong(self) -> bool:
        return self.strong and not self.weak

    @property
    def kind(self) -> str:
        """``code`` for a function to complete, else ``text``."""
        return "code" if "def " in self.prompt and '"""' in self.prompt else "text"


def normalise(text: str) -> str:
    return " ".join(text.split())


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def read_label_file(path: Path, source: str = "") -> list[Example]:
    """A ``prompt,cheap_ok,strong_ok[,...]`` CSV (see the module docstring), in file order."""
    examples = []
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"prompt", "cheap_ok", "strong_ok"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}; "
                             "expected prompt,cheap_ok,strong_ok (0/1)")
        for row in reader:
            strong_j = _number(row.get("strong_joules")) or _number(row.get("joules"))
            logprobs = row.get("cheap_answer_logprobs") or row.get("cheap_logprobs") or ""
            examples.append(Example(
                Path(path).stem, row["prompt"], _flag(row["cheap_ok"]), _flag(row["strong_ok"]),
                source or Path(path).parent.name, row.get("format") or "bare",
                _number(row.get("cheap_joules")), strong_j,
                tuple(float(v) for v in logprobs.split())))
    return examples


def _read_mmlu(folder: Path) -> list[Example]:
    examples = []
    for path in sorted(folder.glob("mmlu_*.csv")):
        subject = path.stem.removeprefix("mmlu_")
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                examples.append(Example(subject, row["prompt"], row[WEAK_COLUMN] == "True",
                                        row[STRONG_COLUMN] == "True", "mmlu"))
    return examples


def contaminated(data_dir: Path) -> set[str]:
    """Normalised MMLU prompts that match a common router-training prompt (kept out)."""
    listing = Path(data_dir) / "mmlu" / "contaminated_prompts.jsonl"
    out: set[str] = set()
    if listing.exists():
        for line in listing.read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                out.update(normalise(item[k]) for k in ("eval_prompt", "train_prompt")
                           if item.get(k))
    return out


def load_sources(data_dir: Path) -> dict[str, list[Example]]:
    """Every labelled source under ``data_dir`` (source name → its prompts), contaminated
    MMLU prompts left out; sources in name order."""
    data_dir = Path(data_dir)
    dropped = contaminated(data_dir)
    sources: dict[str, list[Example]] = {}
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        if folder.name in UNLABELLED:
            continue
        if folder.name == "mmlu":
            examples = _read_mmlu(folder)
        else:
            examples = [e for path in sorted(folder.glob("*.csv"))
                        for e in read_label_file(path, folder.name)]
        examples = [e for e in examples if normalise(e.prompt) not in dropped]
        if examples:
            sources[folder.name] = examples
    if not sources:
        raise FileNotFoundError(f"no labelled routing data under {data_dir}")
    scores = read_prompt_scores(data_dir / PROMPT_SCORES)
    worded: dict[str, list[tuple[str, float]]] = {}
    for (key, wording), value in read_worded_scores(data_dir / WORDED_SCORES).items():
        worded.setdefault(key, []).append((wording, value))
    if scores or worded:
        sources = {name: [replace(e, prompt_logprob=scores.get(e.key),
                                  worded_logprobs=tuple(worded.get(e.key, ()))) for e in rows]
                   for name, rows in sources.items()}
    return sources


def read_prompt_scores(path: Path) -> dict[str, float]:
    """:data:`PROMPT_SCORES`: example key → the cheap tier's mean log-probability of it."""
    if not path.exists():
        return {}
    with path.open(newline="") as fh:
        return {row["key"]: float(row["mean_logprob"]) for row in csv.DictReader(fh)}


def read_worded_scores(path: Path) -> dict[tuple[str, str], float]:
    """:data:`WORDED_SCORES`: (example key, wording) → the cheap tier's mean log-probability
    of the prompt asked so."""
    if not path.exists():
        return {}
    with path.open(newline="") as fh:
        return {(row["key"], row["wording"]): float(row["mean_logprob"])
                for row in csv.DictReader(fh)}


def _few_shot(example_kind: str, prompt: str) -> str:
    if example_kind == "code":
        return FEW_SHOT["code"] + prompt
    return f"{FEW_SHOT['text']}Question: {prompt}\nAnswer:"


def code_chat(code: str) -> str:
    """A code task's chat message: the instruction, then the code in a fence (how
    benchmarks/humaneval.py and ``joulegate router collect humaneval`` ask the tiers)."""
    return f"{CODE_INSTRUCTION}\n\n```python\n{code}```"


def request_for(example: Example, wording: str | None = None) -> GenerationRequest:
    """The request a labelled prompt becomes in ``wording`` (one of :data:`FORMATS`; default:
    the format it was labelled in). ``completion`` is a text completion (a code task as its
    docstring, anything else as ``Question/Answer``); ``chat`` the task inside an instruction
    (a code task as benchmarks/humaneval.py asks it); ``system`` a bare question after a
    system prompt; ``fewshot`` the question after two worked examples of its kind."""
    wording = wording or example.format
    prompt, kind = example.prompt, example.kind
    if wording == "completion":
        text = prompt if kind == "code" else f"Question: {prompt}\nAnswer:"
        return GenerationRequest(model="auto", prompt=text, max_tokens=512)
    if wording == "chat":
        content = code_chat(prompt) if kind == "code" else f"{TASK_INSTRUCTION}\n\n{prompt}"
        return GenerationRequest(model="auto", messages=[{"role": "user", "content": content}],
                                 max_tokens=512)
    messages: list[dict[str, Any]] = []
    if wording == "system":
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    content = _few_shot(kind, prompt) if wording == "fewshot" else prompt
    messages.append({"role": "user", "content": content})
    return GenerationRequest(model="auto", messages=messages)


def by_source(examples: Iterable[Example]) -> dict[str, list[int]]:
    """Source name → the indices of its examples."""
    out: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        out.setdefault(e.source, []).append(i)
    return out
