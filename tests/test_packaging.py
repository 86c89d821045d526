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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(out), str(ROOT)], check=True, timeout=300)
    return next(out.glob("joulegate-*.whl"))


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked alone: what a non-editable install puts in site-packages."""
    site = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(wheel).extractall(site)
    return site


def from_wheel(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python *args`` importing joulegate from ``site`` only (not from the checkout)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(site), "PATH": "/usr/bin"},
                          check=False)


def test_wheel_contains_every_module_and_the_default_policy(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)) for pkg in ("gateway", "backends", "policies")
                for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    assert expected and expected <= names, sorted(expected - names)
    assert "policies/default.yaml" in names
    assert "gateway/routing/router_model.json" in names  # the learned estimator
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "joulegate = gateway.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_wheel_alone_serves_and_routes_a_policy_without_a_routing_section(site, tmp_path):
    """A routing section left out falls back to built-in defaults that need nothing beyond
    the installed package (no repository files, no data folder)."""
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
    out = from_wheel(site, tmp_path, "-c", script)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["estimator"] == "learned" and 0.0 <= result["score"] <= 1.0


def test_router_train_from_a_wheel_says_to_pass_data(site, tmp_path):
    """The routing data ships with the source tree, not the wheel: one line, no traceback."""
    out = from_wheel(site, tmp_path, "-m", "gateway.cli", "router", "train",
                     "--out", str(tmp_path / "model.json"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("joulegate: no routing data at ") and "pass --data DIR" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "model.json").exists()
