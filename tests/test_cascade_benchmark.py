"""benchmarks/cascade.py: what a cascade and a one-shot router cost and earn on labelled rows,
and that a row labelled in a wording (HumanEval's chat or completion request) is scored as
that request, not as a bare question."""

from __future__ import annotations

import csv
import functools
import importlib.util
import math
import sys
from pathlib import Path

import pytest

from gateway.routing import create_estimator
from gateway.routing.labels import Example, request_for

pytestmark = pytest.mark.unit

_SPEC = importlib.util.spec_from_file_location(
    "cascade_bench", Path(__file__).resolve().parent.parent / "benchmarks" / "cascade.py")
cascade = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = cascade  # its dataclasses look their module up
_SPEC.loader.exec_module(cascade)

CODE = 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n'
COLUMNS = ["prompt", "cheap_ok", "strong_ok", "cheap_joules", "strong_joules", "format",
           "cheap_prompt_tokens", "cheap_completion_tokens", "cheap_logprobs"]


def write(path: Path, rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def test_rows_keep_their_wording_and_are_scored_as_the_request_sent(tmp_path):
    labels = write(tmp_path / "chat.csv", [
        [CODE, 1, 1, "100.0", "300.0", "chat", 50, 40, "-0.1 -0.2"],
        [CODE, 0, 1, "100.0", "300.0", "completion", 50, 40, "-0.1 -0.2"],
        ["What is 2+2?", 1, 1, "10.0", "30.0", "", 20, 2, "-0.5"],
        ["no probe", 1, 1, "10.0", "30.0", "chat", 20, 2, ""],  # left out: nothing to judge
    ])
    rows = cascade.load([labels])
    assert [r.format for r in rows] == ["chat", "completion", "bare"]

    heuristic = create_estimator("heuristic")
    scores = cascade.estimator_scores("heuristic", rows)
    for row, score in zip(rows[:2], scores[:2], strict=True):
        asked = request_for(Example("", row.prompt, row.cheap_ok, row.strong_ok, row.source,
                                    row.format))
        assert score == heuristic.score(asked).score
    # The two wordings of one prompt are two different requests to the router.
    assert request_for(Example("", CODE, True, True, "x", "chat")).messages is not None
    assert request_for(Example("", CODE, True, True, "x", "completion")).prompt == CODE


def test_a_cascade_pays_the_probe_and_the_strong_answer_only_when_it_escalates(tmp_path):
    rows = cascade.load([write(tmp_path / "l.csv", [
        ["sure", 1, 1, "110.0", "500.0", "chat", 100, 100, " ".join(["0"] * 8)],
        ["unsure", 0, 1, "110.0", "500.0", "chat", 100, 100, " ".join(["-3"] * 8)],
    ])])
    sure, unsure = rows
    assert sure.confidence(8) == 1.0 and unsure.confidence(8) == pytest.approx(math.exp(-3))
    # The probe is the prompt (weighted as the tier's prompt tokens) and 8 of 100 tokens.
    weight = cascade.PROMPT_WEIGHT
    probe = 110.0 * (weight * 100 + 8) / (weight * 100 + 100)
    assert unsure.probe_joules(8) == pytest.approx(probe)
    right, joules = cascade.cascade_point(rows, 8, 0.5)
    assert right == 2  # the sure answer kept, the unsure one escalated and right
    assert joules == pytest.approx(110.0 + probe + 500.0)
    right, joules = cascade.cascade_point(rows, 8, 0.0)  # nothing escalates
    assert (right, joules) == (1, 220.0)


def test_the_whole_answers_log_probabilities_come_first_and_min_finds_one_unsure_token(tmp_path):
    path = tmp_path / "l.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*COLUMNS, "cheap_answer_logprobs"])
        writer.writerow([CODE, 0, 1, "100.0", "300.0", "completion", 50, 40, "-0.1 -0.1",
                         "-0.1 -0.1 -0.1 -2.0"])
    row = cascade.load([path])[0]
    assert row.logprobs == (-0.1, -0.1, -0.1, -2.0)
    assert row.confidence(4, "min") == pytest.approx(math.exp(-2.0))
    assert row.confidence(4) == pytest.approx(math.exp(-0.575))
    assert row.confidence(3, "min") == pytest.approx(math.exp(-0.1))


def test_a_cascade_that_no_threshold_makes_good_enough_escalates_everything(tmp_path):
    rows = cascade.load([write(tmp_path / "l.csv", [
        ["a", 0, 1, "100.0", "300.0", "chat", 10, 10, "-0.1"],
        ["b", 1, 1, "100.0", "300.0", "chat", 10, 10, "-0.2"],
    ])])
    point, candidates, fallback = cascade.cascade_router(rows, 8, "min")
    # Both right needs escalating a, the surer of the two: a threshold above both.
    assert cascade.choose([0, 1], point, candidates, 2)[0] > math.exp(-0.1)
    assert cascade.choose([0, 1], point, candidates, 3) is None
    assert point([0, 1], fallback)[0] == 2  # the fallback escalates every prompt


def _module(name: str, file: str):
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parent.parent / "benchmarks" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_a_cascade_run_is_replayed_at_other_thresholds_from_its_own_confidences(monkeypatch):
    # Run as a script, humaneval.py finds its neighbour benchmarks/cascade.py on the path.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    humaneval = _module("humaneval_bench", "humaneval.py")

    def row(passed, joules, **kw):
        return {"passed": passed, "energy_joules": joules, "prompt_tokens": 0,
                "completion_tokens": 100, **kw}

    ids = ["a", "b", "c", "d"]
    # The run (threshold 0.5): a and b escalated (probe + strong), c and d kept.
    run = {"a": row(True, 330.0, cascade="small->full", cascade_confidence="0.1"),
           "b": row(True, 330.0, cascade="small->full", cascade_confidence="0.4"),
           "c": row(True, 100.0, cascade="small", cascade_confidence="0.6"),
           "d": row(False, 100.0, cascade="small", cascade_confidence="0.9")}
    cheap = {t: row(t in "bc", 100.0) for t in ids}
    strong = {t: row(t != "c", 300.0) for t in ids}
    probe = functools.partial(humaneval._answer_probe, 30)  # 30 of the cheap answer's tokens
    ranking, _, line = humaneval.cascade_sweep(run, cheap, strong, ids, probe, "k")
    # Least sure first: a (+1 on the strong tier), b (0), c (-1), d (+1): cheap 0.5, strong
    # 0.75, PGR 0, 1, 1, 0, 1 in steps of a quarter: APGR 0.625.
    assert "APGR 0.625 " in ranking
    # Fitted on a and c (strong right on a only: need 0.95 right): keeping both is cheapest,
    # c right on the cheap tier as in the run (threshold -1). Reported on b and d: both kept,
    # b (escalated in the run) costs and scores its cheap answer: 1 right, 200 J.
    # Fitted on b and d (need 1.9): d must escalate, past its 0.9 (threshold 2.0). Reported
    # on a and c: a escalates as in the run (330 J, right); c did not in the run, so it costs
    # 30 of its cheap answer's 100 tokens (30 J) plus the strong answer, wrong there: 1 right.
    assert "(-1.000 / 2.000)" in line
    assert "66.7% of always-strong pass@1 at 71.7% of its joules" in line  # 860 J of 1200


def test_the_prompt_probe_is_priced_from_the_runs_own_escalations(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    humaneval = _module("humaneval_bench", "humaneval.py")
    cheap = {t: {"energy_joules": 100.0, "completion": "cheap"} for t in "abcd"}
    strong = {t: {"energy_joules": 300.0, "completion": "strong"} for t in "abcd"}
    # Escalated with the pinned strong answer: a (330 J at drift 1.1 is 300: no probe),
    # b (363 J: 30 J over strong), c (385 J: 50 J); d kept.
    run = {"a": {"energy_joules": 330.0, "cascade": "small->full", "completion": "strong"},
           "b": {"energy_joules": 363.0, "cascade": "small->full", "completion": "strong"},
           "c": {"energy_joules": 385.0, "cascade": "small->full", "completion": "strong"},
           "d": {"energy_joules": 110.0, "cascade": "small", "completion": "cheap"}}
    assert humaneval.prompt_probe_share(run, cheap, strong, list("abcd"), 1.1) == \
        pytest.approx(0.30)  # the median of 0, 0.30 and 0.50 of the cheap answer's 100 J
    run["b"]["completion"] = run["c"]["completion"] = run["a"]["completion"] = "other"
    assert humaneval.prompt_probe_share(run, cheap, strong, list("abcd"), 1.1) is None
