"""`joulegate budget show|grant|reset|simulate`: simulations checked against hand-computed
expectations; grant and reset through the CLI change what `show` prints."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gateway.budgets import EmbeddedLedger, Limit
from gateway.budgets.simulate import SimulationInputError, read_requests, simulate
from policies import key_digest, load_policy

from .conftest import free_port

REPO = Path(__file__).resolve().parent.parent

# Start of a minute (and inside one hour period): 1_700_000_040 = 2023-11-14T22:14:00Z.
T0 = 1_700_000_040
assert T0 % 60 == 0


def write_policy(folder: Path, ledger: dict | None = None) -> Path:
    """Tiers priced per token. `big`: 0.5 J/prompt token, 2 J/output token; `small`: 0.1 and
    0.5. Tenants: acme degrades (1m window, 500 J), globex rejects (1h, 300 J), initech has
    no budgets and may use `small` only, umbrella has long windows for grant/reset."""
    def backend():
        return {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}  # never contacted

    def keys(name):
        return [f"sha256:{key_digest('sk-' + name)}"]

    policy = {
        "version": 1,
        "state_dir": str(folder / "state"),
        "backends": {"up-big": backend(), "up-small": backend()},
        "tiers": [
            {"name": "big", "backend": "up-big", "model": "big-model", "cost": 2,
             "joules_per_prompt_token": 0.5, "joules_per_output_token": 2.0},
            {"name": "small", "backend": "up-small", "model": "small-model", "cost": 1,
             "joules_per_prompt_token": 0.1, "joules_per_output_token": 0.5},
        ],
        "tenants": {
            "acme": {"keys": keys("acme"), "default_tier": "big",
                     "budgets": [{"window": "1m", "joules": 500}], "on_exhausted": "degrade",
                     "degrade_ladder": ["big", "small"], "degrade_max_tokens": 50,
                     "default_max_tokens": 100},
            "globex": {"keys": keys("globex"), "default_tier": "big",
                       "budgets": [{"window": "1h", "joules": 300}], "on_exhausted": "reject",
                       "default_max_tokens": 100},
            "initech": {"keys": keys("initech"), "default_tier": "small", "tiers": ["small"]},
            "umbrella": {"keys": keys("umbrella"), "default_tier": "small",
                         "budgets": [{"window": "30d", "joules": 10000},
                                     {"window": "calendar-month", "joules": 100000}]},
        },
    }
    if ledger:
        policy["ledger"] = ledger
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "budget", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


# -- simulate: JSONL with times crossing a window boundary --------------------------------

JSONL_ROWS = [
    # acme, 1m window of 500 J, degrades to small with max_tokens capped at 50.
    # 1: big, predicted 100x0.5 + 100x2 = 250 J (fits 500); spends 100x0.5 + 80x2 = 210 J.
    #    Left: 290 J.
    {"tenant": "acme", "prompt_tokens": 100, "max_tokens": 100, "completion_tokens": 80,
     "time": T0},
    # globex, 1h window of 300 J, rejects. Pins small: predicted 20x0.1 + 100x0.5 = 52 J;
    # spends 20x0.1 + 60x0.5 = 32 J. Left: 268 J.
    {"tenant": "globex", "prompt_tokens": 20, "max_tokens": 100, "model": "small",
     "completion_tokens": 60, "time": T0 + 5},
    # acme 2: big 250 J <= 290: served; spends all of max_tokens: 250 J. Left: 40 J
    # (used 460/500 = 92%: past the 80% soft limit).
    {"tenant": "acme", "prompt_tokens": 100, "max_tokens": 100, "time": T0 + 10},
    # globex: big (default tier), max_tokens 100 by default: predicted 40x0.5 + 100x2 = 220 J
    # <= 268: served, spends 220 J. Left: 48 J.
    {"tenant": "globex", "prompt_tokens": 40, "time": T0 + 15},
    # acme 3: big 250 J > 40; small with 50 tokens: 100x0.1 + 50x0.5 = 35 J <= 40:
    # degraded big->small, spends 35 J (completion = the 50 tokens admitted). Left: 5 J.
    {"tenant": "acme", "prompt_tokens": 100, "max_tokens": 100, "time": T0 + 20},
    # globex: 220 J > 48 and it rejects: refused (exhausted).
    {"tenant": "globex", "prompt_tokens": 40, "max_tokens": 100, "time": T0 + 25},
    # acme 4: big 250 > 5, small 35 > 5: refused (exhausted), short in its 1m window.
    {"tenant": "acme", "prompt_tokens": 100, "max_tokens": 100, "time": T0 + 30},
    # initech, no budgets, small: no max_tokens, 200 produced: 100x0.1 + 200x0.5 = 110 J.
    {"tenant": "initech", "prompt_tokens": 100, "completion_tokens": 200, "time": T0 + 35},
    # initech may not use big: refused (model_not_found), nothing spent.
    {"tenant": "initech", "prompt_tokens": 10, "model": "big-model", "time": T0 + 40},
    # acme 5, a minute later (ISO time): a new 1m period, 500 J free again. Big 250 J fits;
    # spends 100x0.5 + 40x2 = 130 J. Left in the new period: 370 J.
    {"tenant": "acme", "prompt_tokens": 100, "max_tokens": 100, "completion_tokens": 40,
     "time": "2023-11-14T22:15:00Z"},
    # globex, same hour: pins small, 10x0.1 + 20x0.5 = 11 J <= 48; spends 11 J. Left: 37 J.
    {"tenant": "globex", "prompt_tokens": 10, "max_tokens": 20, "model": "small",
     "time": "2023-11-14T22:15:00"},
]
# acme: 5 requests, 3 served (1, 2, 5), 1 degraded (big->small), 1 refused;
#       210 + 250 + 35 + 130 = 625 J (big 590, small 35); 1m at the end: 130 spent, 370 left.
# globex: 4 requests, 3 served, 1 refused; 32 + 220 + 11 = 263 J; 1h: 263 spent, 37 left.
# initech: 2 requests, 1 served, 1 refused (model_not_found); 110 J; no budgets.
# Totals: 11 requests, 7 served, 1 degraded, 3 refused, 625 + 263 + 110 = 998 J.


def check_jsonl_report(tenants: dict, totals: dict) -> None:
    acme, globex, initech = tenants["acme"], tenants["globex"], tenants["initech"]
    assert (acme["requests"], acme["served"], acme["degraded"], acme["refused"]) == (5, 3, 1, 1)
    assert acme["degraded_by"] == {"big->small": 1} and acme["refused_by"] == {"exhausted": 1}
    assert acme["joules"] == pytest.approx(625.0)
    assert acme["joules_by_tier"] == pytest.approx({"big": 590.0, "small": 35.0})
    (window,) = acme["windows"]
    assert window["window"] == "1m" and window["period_start"] == T0 + 60
    assert window["spent_joules"] == pytest.approx(130.0)
    assert window["remaining_joules"] == pytest.approx(370.0)
    assert (globex["requests"], globex["served"], globex["degraded"], globex["refused"]) == \
        (4, 3, 0, 1)
    assert globex["refused_by"] == {"exhausted": 1}
    assert globex["joules"] == pytest.approx(263.0)
    (window,) = globex["windows"]
    assert window["spent_joules"] == pytest.approx(263.0)
    assert window["remaining_joules"] == pytest.approx(37.0)
    assert (initech["requests"], initech["served"], initech["refused"]) == (2, 1, 1)
    assert initech["refused_by"] == {"model_not_found": 1}
    assert initech["joules"] == pytest.approx(110.0) and initech["windows"] == []
    assert totals == {"requests": 11, "served": 7, "degraded": 1, "refused": 3,
                      "joules": pytest.approx(998.0)}


def write_jsonl(folder: Path) -> Path:
    path = folder / "requests.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in JSONL_ROWS) + "\n\n")
    return path


@pytest.mark.unit
def test_simulate_jsonl_across_a_window_boundary(tmp_path):
    policy = load_policy(write_policy(tmp_path))
    report = simulate(policy, read_requests(write_jsonl(tmp_path)))
    assert list(report.tenants) == ["acme", "globex", "initech"]
    assert (report.start, report.end) == (T0, T0 + 60)
    outcomes = [(r.tenant, r.outcome, r.tier, r.reason) for r in report.requests]
    assert outcomes == [
        ("acme", "served", "big", None), ("globex", "served", "small", None),
        ("acme", "served", "big", None), ("globex", "served", "big", None),
        ("acme", "degraded", "small", None), ("globex", "refused", None, "exhausted"),
        ("acme", "refused", None, "exhausted"), ("initech", "served", "small", None),
        ("initech", "refused", None, "model_not_found"), ("acme", "served", "big", None),
        ("globex", "served", "small", None)]
    joules = [r.joules for r in report.requests]
    assert joules == pytest.approx([210, 32, 250, 220, 35, 0, 0, 110, 0, 130, 11])
    predicted = [r.predicted_joules for r in report.requests]
    assert predicted == pytest.approx([250, 52, 250, 220, 35, 220, 250, 0, 0, 250, 11])
    degraded = report.requests[4]
    assert (degraded.requested_tier, degraded.max_tokens, degraded.completion_tokens) == \
        ("big", 50, 50)
    assert report.requests[2].warning == "1m=92%"
    assert report.requests[6].short_windows == ["1m"]
    assert report.requests[7].max_tokens is None  # no budgets: nothing injected
    # The same numbers as the CLI's JSON.
    from gateway.cli.budget import _report_json
    data = _report_json(report)
    check_jsonl_report(data["tenants"], data["totals"])


@pytest.mark.unit
def test_simulate_leaves_the_policys_ledger_alone(tmp_path):
    policy_file = write_policy(tmp_path)
    simulate(load_policy(policy_file), read_requests(write_jsonl(tmp_path)))
    assert not (tmp_path / "state").exists()


@pytest.mark.e2e
def test_simulate_cli_json_and_table(tmp_path):
    policy_file = write_policy(tmp_path)
    requests = write_jsonl(tmp_path)
    out = cli("simulate", str(requests), "--policy", str(policy_file), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    check_jsonl_report(data["tenants"], data["totals"])
    assert [r["outcome"] for r in data["requests"]].count("refused") == 3
    table = cli("simulate", str(requests), "--policy", str(policy_file))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].split() == ["tenant", "requests", "served", "degraded", "refused", "joules"]
    assert lines[2].split() == ["acme", "5", "3", "1", "1", "625.0"]
    assert lines[3].split() == ["globex", "4", "3", "0", "1", "263.0"]
    assert lines[4].split() == ["initech", "2", "1", "0", "1", "110.0"]
    assert lines[5].split() == ["total", "11", "7", "1", "3", "998.0"]
    assert "  degraded: big->small 1" in lines and "  refused: model_not_found 1" in lines
    # acme's window at the end: limit, granted, spent, reserved, remaining, resets in 60 s.
    assert any(line.split()[:7] == ["1m", "500.0", "0.0", "130.0", "0.0", "370.0", "60"]
               for line in lines)
    assert not (tmp_path / "state").exists()


# -- simulate: CSV, every request at one instant ----------------------------------------

CSV = """tenant,prompt_tokens,max_tokens,model,completion_tokens
acme,200,100,,
acme,200,,,
acme,100,100,small,10
globex,100,,,
globex,100,100,,
initech,50,,,
"""
# All at one instant, so acme's 1m window never frees.
# acme 1: big, 200x0.5 + 100x2 = 300 J <= 500, spends all 100 tokens: 300 J. Left 200 J.
# acme 2: max_tokens defaults to acme's 100: big 300 > 200; small, 50 tokens:
#         200x0.1 + 50x0.5 = 45 J <= 200: degraded, spends 45 J. Left 155 J.
# acme 3: pins small: 100x0.1 + 100x0.5 = 60 J <= 155: served on the tier it asked for;
#         produced 10 tokens: 100x0.1 + 10x0.5 = 15 J. Left 140 J.
# globex 1: big, default 100 tokens: 100x0.5 + 100x2 = 250 J <= 300: spends 250 J. Left 50.
# globex 2: 250 > 50, rejects: refused.
# initech: no budgets; no max_tokens: completion = default_max_tokens 1024:
#          50x0.1 + 1024x0.5 = 517 J.
# acme: 3 requests, 2 served, 1 degraded, 0 refused, 300 + 45 + 15 = 360 J, 140 J left.
# globex: 2 requests, 1 served, 1 refused, 250 J, 50 J left. initech: 1 served, 517 J.


@pytest.mark.unit
def test_simulate_csv_at_one_instant(tmp_path):
    path = tmp_path / "requests.csv"
    path.write_text("\ufeff" + CSV, encoding="utf-8")  # as spreadsheets save it, with a BOM
    report = simulate(load_policy(write_policy(tmp_path)), read_requests(path), now=T0 + 7)
    assert report.start == report.end == T0 + 7
    acme, globex, initech = (report.tenants[t] for t in ("acme", "globex", "initech"))
    assert (acme.requests, acme.served, acme.degraded, acme.refused) == (3, 2, 1, 0)
    assert acme.degraded_by == {"big->small": 1}
    assert acme.joules == pytest.approx(360.0)
    assert acme.windows[0].remaining == pytest.approx(140.0)
    assert (globex.requests, globex.served, globex.refused) == (2, 1, 1)
    assert globex.joules == pytest.approx(250.0)
    assert globex.windows[0].remaining == pytest.approx(50.0)
    assert (initech.served, initech.joules) == (1, pytest.approx(517.0))
    assert [r.completion_tokens for r in report.requests] == [100, 50, 10, 100, 0, 1024]
    assert [r.outcome for r in report.requests] == \
        ["served", "degraded", "served", "served", "refused", "served"]


@pytest.mark.e2e
def test_simulate_cli_csv_detected_by_content(tmp_path):
    path = tmp_path / "requests.txt"  # no telling extension: CSV by its content
    path.write_text(CSV)
    out = cli("simulate", str(path), "--policy", str(write_policy(tmp_path)), "--json")
    assert out.returncode == 0, out.stderr
    totals = json.loads(out.stdout)["totals"]
    # 6 requests: served acme 1 and 3, globex 1, initech; degraded acme 2; refused globex 2.
    assert totals == {"requests": 6, "served": 4, "degraded": 1, "refused": 1,
                      "joules": pytest.approx(360.0 + 250.0 + 517.0)}


@pytest.mark.unit
@pytest.mark.parametrize(("name", "text", "message"), [
    ("r.jsonl", '{"tenant": "acme"}\n', "'prompt_tokens' is required"),
    ("r.jsonl", '{"tenant": "acme", "prompt_tokens": -1}\n', "whole number >= 0"),
    ("r.jsonl", '{"tenant": "acme", "prompt_tokens": 1, "max_tokens": 0}\n', "'max_tokens'"),
    ("r.jsonl", '{"tenant": "acme", "prompt_tokens": 1, "colour": 1}\n', "unknown column"),
    ("r.jsonl", '{"tenant": "acme", "prompt_tokens": 1, "time": "soon"}\n', "ISO-8601"),
    ("r.jsonl", "[1, 2]\n", "a JSON object per line"),
    ("r.jsonl", "{oops\n", "not valid JSON"),
    ("r.csv", "tenant,max_tokens\nacme,5\n", "tenant and prompt_tokens"),
    ("r.csv", "tenant,prompt_tokens\nacme,many\n", "r.csv:2: 'prompt_tokens'"),
    ("r.csv", "tenant,prompt_tokens\n", "no requests"),
])
def test_bad_request_files_name_the_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SimulationInputError, match=message):
        read_requests(path)


@pytest.mark.unit
def test_unknown_tenant_and_time_going_backwards(tmp_path):
    policy = load_policy(write_policy(tmp_path))
    path = tmp_path / "r.jsonl"
    path.write_text('{"tenant": "acme", "prompt_tokens": 1}\n'
                    '{"tenant": "hooli", "prompt_tokens": 1}\n')
    with pytest.raises(SimulationInputError, match=r"r.jsonl:2: no tenant 'hooli'"):
        simulate(policy, read_requests(path), source=str(path))
    path.write_text(f'{{"tenant": "acme", "prompt_tokens": 1, "time": {T0}}}\n'
                    f'{{"tenant": "acme", "prompt_tokens": 1, "time": {T0 - 1}}}\n')
    with pytest.raises(SimulationInputError, match="goes backwards"):
        simulate(policy, read_requests(path), source=str(path))


@pytest.mark.e2e
def test_simulate_cli_bad_file_is_one_line_exit_2(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"tenant": "hooli", "prompt_tokens": 3}\n')
    out = cli("simulate", str(path), "--policy", str(write_policy(tmp_path)))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"{path}:1: no tenant 'hooli' in the policy (tenants: acme, globex, initech, umbrella)"]


# -- show, grant, reset ----------------------------------------------------------------


def window_rows(stdout: str) -> dict[str, list[float]]:
    """`show`'s table: window → [limit, granted, spent, reserved, remaining]."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in ("1m", "1h", "1d", "7d", "30d", "calendar-month"):
            rows[cells[0]] = [float(c) for c in cells[1:6]]
    return rows


@pytest.mark.e2e
def test_grant_and_reset_change_what_show_prints(tmp_path):
    policy = write_policy(tmp_path)
    # Spend 1200 J in both of umbrella's windows, as the gateway would have.
    ledger = EmbeddedLedger(tmp_path / "state" / "ledger.sqlite")
    limits = [Limit("30d", 10000), Limit("calendar-month", 100000)]
    asyncio.run(ledger.record("umbrella", "r1", 1200.0, limits, time.time()))
    asyncio.run(ledger.close())

    show = cli("show", "umbrella", "--policy", str(policy))
    assert show.returncode == 0, show.stderr
    assert window_rows(show.stdout) == {"30d": [10000, 0, 1200, 0, 8800],
                                        "calendar-month": [100000, 0, 1200, 0, 98800]}

    grant = cli("grant", "umbrella", "--window", "30d", "--joules", "5000", "--policy", str(policy))
    assert grant.returncode == 0, grant.stderr
    after_grant = {"30d": [10000, 5000, 1200, 0, 13800],
                   "calendar-month": [100000, 0, 1200, 0, 98800]}
    assert window_rows(grant.stdout) == after_grant  # grant prints the new state
    assert window_rows(cli("show", "umbrella", "--policy", str(policy)).stdout) == after_grant

    # An unknown window among those asked for: exit 2, one line, nothing reset.
    bad = cli("reset", "umbrella", "--window", "30d", "--window", "1h", "--policy", str(policy))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "tenant 'umbrella' has no '1h' budget window; its windows: 30d, calendar-month"]
    assert window_rows(cli("show", "umbrella", "--policy", str(policy)).stdout) == after_grant

    one = cli("reset", "umbrella", "--window", "30d", "--policy", str(policy))
    assert one.returncode == 0, one.stderr
    assert window_rows(one.stdout) == {"30d": [10000, 0, 0, 0, 10000],
                                       "calendar-month": [100000, 0, 1200, 0, 98800]}
    every = cli("reset", "umbrella", "--policy", str(policy))
    assert every.returncode == 0, every.stderr
    assert window_rows(every.stdout) == {"30d": [10000, 0, 0, 0, 10000],
                                         "calendar-month": [100000, 0, 0, 0, 100000]}


@pytest.mark.e2e
@pytest.mark.parametrize(("args", "status", "message"), [
    (["grant", "hooli", "--window", "1h", "--joules", "5"], 1, "no tenant 'hooli' in the policy"),
    (["reset", "initech"], 1, "tenant 'initech' has no budgets"),
    (["grant", "umbrella", "--window", "1h", "--joules", "5"], 2, "no '1h' budget window"),
    (["grant", "umbrella", "--window", "30d", "--joules", "0"], 2, "must be a positive number"),
    (["grant", "umbrella", "--window", "30d", "--joules", "-5"], 2, "must be a positive number"),
])
def test_grant_and_reset_errors_are_one_line(tmp_path, args, status, message):
    out = cli(*args, "--policy", str(write_policy(tmp_path)))
    assert out.returncode == status and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert message in line
    assert not (tmp_path / "state" / "ledger.sqlite").exists()


@pytest.mark.e2e
def test_ledger_unavailable_is_one_line(tmp_path):
    policy = write_policy(tmp_path, ledger={"kind": "redis",
                                            "url": f"redis://127.0.0.1:{free_port()}/0"})
    for args in (["show", "umbrella"], ["grant", "umbrella", "--window", "30d", "--joules", "5"],
                 ["reset", "umbrella"]):
        out = cli(*args, "--policy", str(policy))
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith("the ledger is unavailable")


@pytest.mark.unit
def test_a_request_larger_than_the_whole_window_is_refused_as_never_fitting(tmp_path):
    path = tmp_path / "r.jsonl"
    # globex rejects; 10x0.5 + 1000x2 = 2005 J > its whole 300 J 1h budget: it can never
    # fit (the gateway's 400), unlike 220 J that fit once the window frees (429).
    path.write_text('{"tenant": "globex", "prompt_tokens": 10, "max_tokens": 1000}\n')
    report = simulate(load_policy(write_policy(tmp_path)), read_requests(path), now=T0)
    (outcome,) = report.requests
    assert (outcome.outcome, outcome.reason) == ("refused", "exceeds_window")
    assert outcome.predicted_joules == pytest.approx(2005.0)
    assert outcome.short_windows == ["1h"]
    assert report.tenants["globex"].refused_by == {"exceeds_window": 1}
