"""The built wheel holds every module and the shipped policy (a non-editable install works)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def test_wheel_contains_every_module_and_the_default_policy(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, timeout=300)
    wheel = next(tmp_path.glob("joulegate-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)) for pkg in ("gateway", "backends", "policies")
                for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    assert expected and expected <= names, sorted(expected - names)
    assert "policies/default.yaml" in names
    assert "gateway/routing/router_model.json" in names  # the learned estimator
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "joulegate = gateway.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_wheel_alone_serves_and_routes_a_policy_without_a_routing_section(tmp_path):
    """A routing section left out falls back to built-in defaults that need nothing beyond
    the installed package (no repository files, no data folder)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, timeout=300)
    site = tmp_path / "site"
    zipfile.ZipFile(next(tmp_path.glob("joulegate-*.whl"))).extractall(site)
    policy = tmp_path / "policy.yaml"
    policy.write_text("""version: 1
backends: {up: {kind: openai, base_url: "http://127.0.0.1:9/v1"}}
tiers:
  - {name: small, backend: up, model: s, cost: 1}
  - {name: full, backend: up, model: f, cost: 2}
tenants: {t: {keys: ["sha256:%s"], default_tier: small}}
""" % ("0" * 64))
    script = f"""
import gateway, json
from pathlib import Path
from policies import load_policy
from backends import GenerationRequest
from gateway.routing import create_estimator
assert Path(gateway.__file__).is_relative_to({str(site)!r}), gateway.__file__
policy = load_policy({str(policy)!r})
assert policy.routing is None
routing = policy.tenant_routing("t")
estimator = create_estimator(routing.estimator)
score = estimator.score(GenerationRequest(model="auto", messages=[{{"role": "user",
    "content": "Prove that there are infinitely many primes."}}])).score
print(json.dumps({{"estimator": estimator.name, "score": score}}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={"PYTHONPATH": str(site), "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["estimator"] == "learned" and 0.0 <= result["score"] <= 1.0
