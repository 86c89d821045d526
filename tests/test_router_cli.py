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


@pytest.mark.e2e
@pytest.mark.bench
def test_router_eval_writes_table_and_plot_and_learned_beats_the_baselines(tmp_path):
    # No --data: the CLI reads the routing data that ships in the checkout.
    env = {k: v for k, v in os.environ.items() if k != "JOULEGATE_ROUTING_DATA"}
    out = joulegate("router", "eval", "--out-dir", str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in out.stdout.splitlines() if line.startswith("| ") and "APGR" not in line}
    assert set(rows) == {"random", "length", "heuristic", "learned"}
    apgr = {name: float(cells[0]) for name, cells in rows.items()}
    assert apgr["random"] == pytest.approx(0.5, abs=1e-3)
    # The target: >= 0.65 on held-out subjects, above both baselines.
    assert apgr["learned"] >= 0.65 and apgr["learned"] > apgr["length"] > apgr["random"]
    (png,) = tmp_path.glob("router-eval-*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    (md,) = tmp_path.glob("router-eval-*.md")
    report = md.read_text()
    assert "held-out" in report and png.name in report
    assert report.count("APGR held out:") == 4  # each fold's own figure and chosen model


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
