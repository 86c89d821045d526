"""`joulegate route` and `joulegate router eval` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def joulegate(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, timeout=600, **kw, check=False)


@pytest.mark.e2e  # runs the CLI as a subprocess
def test_route_prints_score_features_and_tier():
    easy = joulegate("route", "What is 2 + 2?", "--json")
    hard = joulegate("route", "--json", "--", "Prove step by step that the following algorithm "
                     "is correct, derive its complexity and compare it with a heap.\n```python\n"
                     "def f(xs):\n    return sorted(xs)\n```\n" + "Think about edge cases. " * 40)
    assert easy.returncode == 0 and hard.returncode == 0, easy.stderr + hard.stderr
    e, h = json.loads(easy.stdout), json.loads(hard.stdout)
    assert e["estimator"] == "heuristic" and e["thresholds"] == {"full": 0.45}  # default policy
    assert (e["tier"], h["tier"]) == ("small", "full") and e["score"] < 0.45 <= h["score"]
    assert h["features"]["code"] > 0 and h["features"]["steps"] > 0
    text = joulegate("route", "What is 2 + 2?", "--estimator", "learned")
    assert text.returncode == 0 and "estimator learned" in text.stdout
    bad = joulegate("route", "x", "--estimator", "bert")
    assert bad.returncode == 2 and "unknown difficulty estimator 'bert'" in bad.stderr


ESTIMATORS = ("heuristic", "learned", "semantic")


@pytest.mark.e2e
@pytest.mark.bench
def test_router_eval_leaves_each_dataset_out_and_writes_table_and_plot(tmp_path):
    # No --data: the CLI reads the routing data that ships in the checkout. One extra
    # wording keeps the run short; every estimator is refitted per held-out source.
    env = {k: v for k, v in os.environ.items() if k != "JOULEGATE_ROUTING_DATA"}
    out = joulegate("router", "eval", "--out-dir", str(tmp_path), "--wordings", "chat", env=env)
    assert out.returncode == 0, out.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines()
            if line.startswith("| ") and "APGR" not in line and "---" not in line]
    # The main table's rows name a source, then an estimator; the summary's an estimator.
    main = [r for r in rows if len(r) == 9 and r[1] in (*ESTIMATORS, "random", "oracle")]
    held = {r[0] for r in main}
    assert {"mmlu", "humaneval", "humaneval/chat", "humaneval/completion"} <= held
    apgr = {(r[0], r[1]): float(r[2]) for r in main}
    p = {(r[0], r[1]): r[3] for r in main}
    for source in ("mmlu", "humaneval"):
        assert apgr[(source, "random")] == pytest.approx(0.5, abs=1e-3)
        assert apgr[(source, "oracle")] > 1.0
        assert {(source, n) for n in ESTIMATORS} <= set(apgr)
        assert p[(source, "random")] == "-"  # a baseline is not tested against chance
    # MMLU's 11,613 prompts: the heuristic's 0.64 is far past random routing's spread.
    assert float(p[("mmlu", "heuristic")]) < 0.01
    summary = {r[0]: r for r in rows if len(r) == 9 and r[0] in ESTIMATORS}
    assert 0.0 < float(summary["heuristic"][4]) <= 1.0  # the mean's p
    assert summary["heuristic"][5].endswith(f"of {summary['heuristic'][1]}")
    assert "held out mmlu: fitting learned and semantic on" in out.stderr  # progress
    (png,) = tmp_path.glob("router-eval-*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    (md,) = tmp_path.glob("router-eval-*.md")
    report = md.read_text()
    assert "leave one dataset out" in report and png.name in report
    assert "random routing's APGR" in report and "middle 95%" in report
    assert "Robustness to wording" in report and "| chat |" in report


@pytest.mark.e2e  # runs the CLI as a subprocess
def test_check_policy_names_an_unknown_estimator(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"""version: 1
backends: {{b: {{kind: openai, base_url: "http://127.0.0.1:9/v1"}}}}
tiers: [{{name: small, backend: b, model: s, cost: 1}}, {{name: big, backend: b, model: g, cost: 2}}]
tenants:
  t: {{keys: ["sha256:{'0' * 64}"], default_tier: small, routing: {{estimator: bert}}}}
""")
    out = joulegate("check-policy", str(policy))
    assert out.returncode == 1
    assert "tenants.t.routing.estimator: unknown difficulty estimator 'bert'" in out.stderr
