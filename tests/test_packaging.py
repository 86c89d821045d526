"""The built wheel holds every module and the shipped policy (a non-editable install works)."""

from __future__ import annotations

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
