#!/usr/bin/env python3
"""Two routing signals beyond the shipped ones, measured out of domain (issue 18): do they
rank the prompts that need the strong tier first where every shipped estimator is at chance
(MBPP)? Neither is wired into the gateway; this is the evidence for why not.

``answers``: the cheap tier's *whole* answer, each token scored by the model that wrote it
(teacher forcing, llama.cpp in-process: about the log-probabilities the answer was generated
with at temperature 0; the answer's text is tokenised again, which need not give back the very
tokens generated, and split multi-byte characters decode to U+FFFD). The answers are the
labelled runs' own: HumanEval in the chat wording
(``benchmarks/results/humaneval/small-chat.jsonl``, the Q4_K_M 0.5B, the answers
``data/routing/humaneval/chat.csv`` labels) and MBPP (``data/routing/mbpp/iq4/``: the IQ4_NL
0.5B's run, its answers written by ``joulegate router collect mbpp --replies``). Per answer, the
mean log-probability and the mean entropy over four selections of its tokens: all of them; those
inside its code blocks; those that do not repeat the request's text (a copied signature or
docstring is sure whatever the task); code tokens that do not repeat it. Each is ranked the
least sure first against the labels (APGR; random 0.5), with what a cascade that reads the whole
answer before deciding costs for 95% of the strong tier's quality: every cheap answer, plus the
strong answers of the prompts it escalates (labelled joules; read off the sweep, so an
optimistic figure).

``hidden``: a linear probe over the cheap tier's own hidden state of each labelled prompt
(Qwen2.5-Coder-0.5B Q4_K_M, last layer; the mean over the prompt's tokens, the last token's, or
both), asked in its labelled wording, as the gateway would send it. Ridge regression, sources
weighted equally (weights averaging 1 per training prompt), on the gain (strong right less cheap
right) or on the cheap tier failing, refitted with each source held out (leave one dataset out);
MMLU is a seeded sample of 8 prompts per subject (``prompt_scores.chosen``). Every (features,
target, penalty) of the grid is reported: its best row is chosen *with* the held-out sources, so
it flatters the probe; it is the best of this grid, not of every such probe. The hidden states
are the Q4_K_M's on every source, and so are the labels (MBPP's since it was labelled again on
the Q4_K_M; the report of 2026-12-05 11:57 had the IQ4_NL's).

    .venv/bin/python benchmarks/signal_probes.py answers   # ~25 min on 2 cores
    .venv/bin/python benchmarks/signal_probes.py hidden    # ~17 min on 2 cores

Per-prompt measurements are kept in ``benchmarks/results/runs/signal-probes/`` (an
interrupted ``answers`` run resumes); the tables go to
``benchmarks/results/signal-probes-<what>-<stamp>.md`` and are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import humaneval  # noqa: E402

from gateway.routing.labels import (  # noqa: E402
    MIN_PROMPTS,
    Example,
    load_sources,
    read_label_file,
    request_for,
)
from gateway.routing.train import routing_curve  # noqa: E402

DATA = ROOT / "data" / "routing"
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "runs" / "signal-probes"
SMALL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
SMALL_IQ4 = "qwen2.5-coder-0.5b-instruct-iq4_nl"
#: Characters of left context that, with a token, must occur in the request for the token
#: to count as repeating it.
COPY_CONTEXT = 12
SELECTIONS = ("all", "code", "novel", "novel code")


# --- answers -------------------------------------------------------------------------------

def answer_sets() -> Iterator[tuple[str, str, list[tuple[str, str, str, bool, bool, float, float]]]]:
    """(source, model, [(key, request text, answer, cheap_ok, strong_ok, cheap J, strong J)])."""
    import csv

    labels = {r["task_id"]: r for r in csv.DictReader((DATA / "humaneval" / "chat.csv").open())}
    answers = humaneval.load_cache("small", "chat")
    rows = []
    for problem in humaneval.problems():
        label = labels.get(problem["task_id"])
        if label is None or problem["task_id"] not in answers:
            continue
        user = humaneval.chat_request(problem, "small")["messages"][0]["content"]
        rows.append((problem["task_id"], user, answers[problem["task_id"]]["completion"],
                     label["cheap_ok"] == "1", label["strong_ok"] == "1",
                     float(label["cheap_joules"]), float(label["strong_joules"])))
    yield "humaneval/chat", SMALL, rows

    # The IQ4_NL run's: its labels and its answers, scored by the model that wrote them.
    iq4 = DATA / "mbpp" / "iq4"
    mbpp = {e.prompt: e for e in read_label_file(iq4 / "labels-small-full.csv", "mbpp")}
    rows = []
    for line in (iq4 / "replies-small.jsonl").open():
        reply = json.loads(line)
        e = mbpp[reply["prompt"]]
        rows.append((e.prompt, e.prompt, reply["reply"], e.weak, e.strong,
                     e.weak_joules or 0.0, e.strong_joules or 0.0))
    yield "mbpp", SMALL_IQ4, rows


def score_answers(source: str, model: str, rows: list) -> list[dict[str, Any]]:
    """Each answer's tokens with their log-probabilities and entropies (cached per source)."""
    from tqdm import tqdm

    path = RUNS / f"answers-{source.replace('/', '-')}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if path.exists():
        done = {r["key"]: r for r in map(json.loads, path.open())}
    todo = [r for r in rows if r[0] not in done]
    if todo:
        llm, render = humaneval.scoring_model(model, 2, n_ctx=4096, logits_all=True)
        with path.open("a") as out:
            for key, user, answer, *_ in tqdm(todo, desc=f"{source}: scoring answers",
                                              unit="answer", file=sys.stdout, mininterval=10):
                prompt = llm.tokenize(render([{"role": "user", "content": user}]).encode(),
                                      add_bos=False, special=True)
                tokens = llm.tokenize(answer.encode(), add_bos=False, special=False)
                tokens = tokens[: 4096 - len(prompt) - 1]
                logsm = humaneval.answer_log_softmax(llm, prompt, tokens)
                row = {"key": key,
                       "tokens": [llm.detokenize([t]).decode("utf-8", "replace") for t in tokens],
                       "logprob": [round(float(v), 4) for v in logsm[np.arange(len(tokens)), tokens]],
                       "entropy": [round(float(v), 4)
                                   for v in -(np.exp(logsm) * logsm).sum(axis=1)]}
                out.write(json.dumps(row) + "\n")
                out.flush()
                done[key] = row
    return [done[r[0]] for r in rows]


def selections(tokens: list[str], request: str) -> dict[str, np.ndarray]:
    """Masks over an answer's tokens: inside a ``` block; repeating the request's text."""
    text = "".join(tokens)
    starts = np.cumsum([0] + [len(t) for t in tokens])[:-1]
    fences, at = [], text.find("```")
    while at >= 0:
        fences.append(at)
        at = text.find("```", at + 3)
    if len(fences) % 2:
        fences.append(len(text))  # an unclosed block runs to the end
    code = np.zeros(len(tokens), bool)
    for a, b in zip(fences[0::2], fences[1::2], strict=True):
        code |= (starts >= a) & (starts < b)
    copied = np.array([not t.strip() or text[max(0, s - COPY_CONTEXT): s + len(t)] in request
                       for t, s in zip(tokens, starts, strict=True)], bool)
    return {"all": np.ones(len(tokens), bool), "code": code, "novel": ~copied,
            "novel code": code & ~copied}


def cost_for_95(scores: np.ndarray, weak: np.ndarray, strong: np.ndarray,
                weak_j: np.ndarray, strong_j: np.ndarray) -> tuple[float, float]:
    """A whole-answer cascade escalating the least sure first: the strong share and the
    joules (of always-strong's) at which it first keeps 95% of the strong tier's quality."""
    order = np.argsort(-scores, kind="stable")
    target, n = 0.95 * strong.sum(), len(scores)
    right = weak.sum() + np.concatenate([[0.0], np.cumsum(strong[order] - weak[order])])
    k = int(np.argmax(right >= target - 1e-9))  # there is one: k = n is always-strong
    return k / n, float((weak_j.sum() + strong_j[order[:k]].sum()) / strong_j.sum())


def cmd_answers(_: argparse.Namespace) -> list[str]:
    lines = ["| source | tokens | statistic | APGR | strong share for 95% | joules for 95% "
             "(of always-strong) |", "|---|---|---|---|---|---|"]
    notes = []
    for source, model, rows in answer_sets():
        scored = score_answers(source, model, rows)
        weak, strong = (np.array([r[i] for r in rows], float) for i in (3, 4))
        weak_j, strong_j = (np.array([r[i] for r in rows], float) for i in (5, 6))
        notes.append(f"- {source}: {len(rows)} answers ({model}); cheap right {weak.mean():.3f}, "
                     f"strong {strong.mean():.3f}; every cheap answer costs "
                     f"{weak_j.sum() / strong_j.sum():.1%} of always-strong's joules")
        for name in SELECTIONS:
            for stat in ("logprob", "entropy"):
                values = []
                for (_, request, *_), s in zip(rows, scored, strict=True):
                    mask = selections(s["tokens"], request)[name]
                    v = np.array(s[stat])[mask] if mask.any() else np.array(s[stat])
                    values.append(-v.mean() if stat == "logprob" else v.mean())
                score = np.array(values)  # higher: less sure: escalate first
                apgr = routing_curve(name, score, weak, strong).apgr
                share, joules = cost_for_95(score, weak, strong, weak_j, strong_j)
                label = "mean log-probability" if stat == "logprob" else "mean entropy"
                lines.append(f"| {source} | {name} | {label} | {apgr:.3f} | {share:.1%} | "
                             f"{joules:.1%} |")
    return ["# Whole-answer confidence of the cheap tier as a routing signal", "",
            "`benchmarks/signal_probes.py answers` (see its docstring).", "", *notes, "",
            *lines]


# --- hidden --------------------------------------------------------------------------------

def hidden_states(examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
    """Per example: the last layer's mean over the prompt's tokens, and its last token's."""
    import llama_cpp
    from tqdm import tqdm

    path = RUNS / "hidden.npz"
    keys = [e.key for e in examples]
    if path.exists():
        cached = np.load(path)
        if list(cached["keys"]) == keys:
            return cached["mean"], cached["last"]
    llm, render = humaneval.scoring_model(SMALL, 2, n_ctx=4096, n_batch=4096, n_ubatch=4096,
                                          embedding=True,
                                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE)
    means, lasts = [], []
    for e in tqdm(examples, desc="hidden states", unit="prompt", file=sys.stdout,
                  mininterval=10):
        request = request_for(e)
        if request.prompt is not None:
            tokens = llm.tokenize(request.prompt.encode(), add_bos=True, special=False)
        else:
            tokens = llm.tokenize(render(request.messages or []).encode(), add_bos=False,
                                  special=True)
        tokens = tokens[-4000:]
        llm.reset()
        llm.eval(tokens)  # one batch (n_batch covers it), so every token's state is there
        states = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings(llm.ctx),
                                       shape=(len(tokens) * llm.n_embd(),))
        states = states.reshape(len(tokens), llm.n_embd())
        means.append(states.mean(axis=0))
        lasts.append(states[-1].copy())
    RUNS.mkdir(parents=True, exist_ok=True)
    np.savez(path, keys=np.array(keys), mean=np.array(means), last=np.array(lasts))
    return np.array(means), np.array(lasts)


def ridge(x: np.ndarray, y: np.ndarray, weight: np.ndarray, penalty: float
          ) -> Callable[[np.ndarray], np.ndarray]:
    """Weighted ridge regression on standardised features (the intercept not penalised)."""
    mu = weight @ x / weight.sum()
    sd = np.sqrt(weight @ (x - mu) ** 2 / weight.sum()) + 1e-6

    def design(z: np.ndarray) -> np.ndarray:
        return np.hstack([(z - mu) / sd, np.ones((len(z), 1))])

    d = design(x)
    reg = penalty * np.eye(d.shape[1])
    reg[-1, -1] = 0.0
    coef = np.linalg.solve(d.T @ (d * weight[:, None]) + reg, d.T @ (weight * y))
    return lambda z: design(z) @ coef


def cmd_hidden(_: argparse.Namespace) -> list[str]:
    from prompt_scores import chosen

    sources = {k: v for k, v in load_sources(DATA).items() if len(v) >= MIN_PROMPTS}
    examples = chosen(sources, 8)
    mean, last = hidden_states(examples)
    src = np.array([e.source for e in examples])
    weak = np.array([e.weak for e in examples], float)
    strong = np.array([e.strong for e in examples], float)
    names = sorted(set(src))
    header = " | ".join(names)
    lines = [f"| features | target | penalty | {header} | mean | worst |",
             "|---|---|---|" + "---|" * (len(names) + 2)]
    best = (-1.0, "")
    for feat, x in (("mean", mean), ("last", last), ("both", np.hstack([mean, last]))):
        for target, y in (("gain", strong - weak), ("cheap fails", 1 - weak)):
            for penalty in (1.0, 10.0, 100.0, 1000.0, 10000.0):
                apgrs = []
                for held in names:
                    train = src != held
                    # equal per source, averaging 1 per training prompt
                    weight = np.array([1.0 / (src[train] == s).sum() for s in src[train]])
                    weight *= len(weight) / weight.sum()
                    model = ridge(x[train], y[train], weight, penalty)
                    test = src == held
                    apgrs.append(routing_curve(held, model(x[test]), weak[test],
                                               strong[test]).apgr)
                row = (f"| {feat} | {target} | {penalty:g} | "
                       + " | ".join(f"{a:.3f}" for a in apgrs)
                       + f" | {np.mean(apgrs):.3f} | {min(apgrs):.3f} |")
                lines.append(row)
                best = max(best, (min(apgrs), row))
    counts = ", ".join(f"{s} {(src == s).sum()}" for s in names)
    return ["# The cheap tier's hidden state of the prompt as a routing signal, "
            "leave one dataset out", "", "`benchmarks/signal_probes.py hidden` (see its "
            f"docstring). Prompts: {counts}. APGR of each held-out source (random 0.5).", "",
            *lines, "", f"Best worst-source row (chosen with the held-out sources): {best[1]}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("answers", help="whole-answer confidence (see the docstring)")
    sub.add_parser("hidden", help="hidden-state probe, leave one dataset out")
    args = parser.parse_args()
    lines = (cmd_answers if args.what == "answers" else cmd_hidden)(args)
    out = RESULTS / f"signal-probes-{args.what}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
