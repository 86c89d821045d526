"""`joulegate check-policy`: every mistake of a file in one pass, each at its line and
column with a did-you-mean, and one install line per backend whose package is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.preflight import CHECKS, REQUIREMENTS, Requirement, missing_extras
from policies import PolicyError, inspect_policy, key_digest, load_policy
from policies.schema import Policy

KEY = "sha256:" + key_digest("k1")

# Nine mistakes of different classes: a misspelt top-level key, an unknown backend kind, a
# duplicate key, a tier naming a misspelt backend, a bad type, a missing key, a misspelt
# default tier, a misspelt estimator (a check beyond the schema) and a misspelt window.
MISTAKES = f"""\
version: 1
servr:
  port: 8080
backends:
  qwen-0.5b:
    kind: llamacpp
    model: qwen2.5-coder-0.5b-instruct-q4_k_m
  qwen-1.5b:
    kind: openai
    base_url: http://127.0.0.1:9/v1
  gpu:
    kind: llamacp
    model: x
tiers:
  - name: small
    backend: qwen-0.5b
    model: small-model
    cost: 1
    cost: 1
  - name: big
    backend: qwen-1.5bb
    model: big-model
    cost: two
  - name: mid
    backend: qwen-1.5b
    cost: 1.5
tenants:
  acme:
    keys: ["{KEY}"]
    default_tier: smal
    routing: {{estimator: heuristik}}
    budgets:
      - {{window: 1dd, joules: 5}}
"""


def at(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """1-based line and column of the ``nth`` occurrence of ``needle`` in ``text``."""
    index = -1
    for _ in range(nth + 1):
        index = text.index(needle, index + 1)
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def expected_mistakes(text: str) -> list[tuple[tuple[int, int], str, str]]:
    """(position, key path, message) of every mistake in MISTAKES, in file order."""
    line, column = at(text, "- name: mid")
    return [
        # Every top-level section, in the schema's order (later issues add sections).
        (at(text, "servr:"), "servr", "unknown key; expected one of: "
         f"{', '.join(Policy.model_fields)} (did you mean 'server'?)"),
        (at(text, "kind: llamacp\n"), "backends.gpu", "unknown backend kind 'llamacp'; expected "
         "one of: 'llamacpp', 'openai', 'vllm', 'wordllama' (did you mean 'llamacpp'?)"),
        (at(text, "cost: 1", nth=1), "tiers[0].cost", "duplicate key 'cost' (first given on "
         f"line {at(text, 'cost: 1')[0]}); give each key once"),
        (at(text, "backend: qwen-1.5bb"), "tiers[1].backend", "unknown backend 'qwen-1.5bb'; "
         "expected one of: gpu, qwen-0.5b, qwen-1.5b (did you mean 'qwen-1.5b'?)"),
        (at(text, "cost: two"), "tiers[1].cost",
         "Input should be a valid number, unable to parse string as a number (got 'two')"),
        # A missing key points at the mapping it is missing from: the list item.
        ((line, column + 2), "tiers[2].model", "required key is missing"),
        (at(text, "default_tier: smal"), "tenants.acme.default_tier",
         "'smal' is not one of this tenant's tiers (big, mid, small) (did you mean 'small'?)"),
        (at(text, "estimator: heuristik"), "tenants.acme.routing.estimator",
         "unknown difficulty estimator 'heuristik'; expected one of: cascade, heuristic, learned, semantic "
         "(did you mean 'heuristic'?)"),
        (at(text, "window: 1dd"), "tenants.acme.budgets[0].window", "Input should be '1m', "
         "'1h', '1d', '7d', '30d' or 'calendar-month' (got '1dd') (did you mean '1d'?)"),
    ]


@pytest.fixture
def mistakes(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(MISTAKES)
    return path


@pytest.mark.unit
def test_every_mistake_is_reported_at_once_at_its_line_and_column(mistakes: Path):
    report = inspect_policy(mistakes, CHECKS)
    assert report.policy is None
    found = [((i.line, i.column), i.path, i.message) for i in report.issues]
    assert found == expected_mistakes(MISTAKES)


@pytest.mark.unit
def test_the_error_message_lists_file_line_column_path_and_message(mistakes: Path):
    with pytest.raises(PolicyError) as info:
        load_policy(mistakes, CHECKS)
    lines = str(info.value).splitlines()
    assert lines[0] == f"invalid policy {mistakes}:"
    assert lines[1:] == [f"  {mistakes}:{line}:{column}: {path}: {message}"
                         for (line, column), path, message in expected_mistakes(MISTAKES)]


@pytest.mark.unit
def test_schema_mistakes_do_not_hide_reference_mistakes(tmp_path: Path):
    # A bad type in one tier and a tenant naming an unknown tier: both in the same pass.
    text = (f"version: 1\nbackends:\n  up: {{kind: openai, base_url: 'http://a:1/v1'}}\n"
            f"tiers:\n  - {{name: small, backend: up, model: m, cost: -1}}\n"
            f"tenants:\n  t: {{keys: ['{KEY}'], tiers: [small, huge], default_tier: small}}\n")
    path = tmp_path / "p.yaml"
    path.write_text(text)
    issues = inspect_policy(path).issues
    assert [(i.line, i.column, i.path) for i in issues] == [
        (*at(text, "cost: -1"), "tiers[0].cost"),
        (*at(text, "huge"), "tenants.t.tiers[1]"),
    ]
    assert issues[1].message == "unknown tier 'huge'; expected one of: small"


@pytest.mark.unit
def test_a_syntax_error_is_reported_at_its_position(tmp_path: Path):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\ntiers: [a, b\n")
    issues = inspect_policy(path).issues
    assert len(issues) == 1 and issues[0].message.startswith("not valid YAML: ")
    assert issues[0].line == 3  # the list is still open at the end of the file


@pytest.mark.e2e
def test_check_policy_cli_reports_all_mistakes(mistakes: Path):
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "check-policy", str(mistakes)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    for (line, column), path, message in expected_mistakes(MISTAKES):
        assert f"{mistakes}:{line}:{column}: {path}: {message}\n" in out.stderr


# -- optional extras -------------------------------------------------------------------------

VALID = f"""\
version: 1
backends:
  qwen-0.5b: {{kind: llamacpp, model: qwen2.5-coder-0.5b-instruct-q4_k_m}}
  spare: {{kind: llamacpp, model: qwen2.5-coder-1.5b-instruct-q4_k_m}}
  up: {{kind: openai, base_url: "http://127.0.0.1:9/v1"}}
tiers:
  - {{name: small, backend: qwen-0.5b, model: small-model, cost: 1}}
  - {{name: big, backend: up, model: big-model, cost: 2}}
tenants:
  acme: {{keys: ["{KEY}"], default_tier: small}}
"""

#: A requirement whose module does not exist: how a missing package looks to find_spec.
ABSENT = {"backend:llamacpp": Requirement("joulegate_test_absent_llama", "llama-cpp-python",
                                          "llamacpp"),
          "backend:vllm:managed": Requirement("joulegate_test_absent_vllm", "vllm", "vllm"),
          "ledger:redis": Requirement("joulegate_test_absent_redis", "redis", "redis")}


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    path = tmp_path / "valid.yaml"
    path.write_text(VALID)
    return path


@pytest.mark.unit
def test_a_missing_package_gives_one_line_with_the_install_command(valid: Path):
    policy = load_policy(valid)
    assert missing_extras(policy, ABSENT) == [
        "tier 'small' uses backend 'qwen-0.5b' (kind llamacpp), which needs llama-cpp-python: "
        "pip install 'joulegate[llamacpp]'",
        "backend 'spare' (kind llamacpp, used by no tier) needs llama-cpp-python: "
        "pip install 'joulegate[llamacpp]'",
    ]
    present = {"backend:llamacpp": Requirement("json", "llama-cpp-python", "llamacpp")}
    assert missing_extras(policy, present) == []


@pytest.mark.unit
def test_managed_vllm_and_a_redis_ledger_need_their_extras():
    data = {"backends": {"v": {"kind": "vllm", "managed": {"model": "/m"}},
                         "w": {"kind": "vllm",
                               "managed": {"model": "/m", "python": "/venv/bin/python"}},
                         "u": {"kind": "vllm", "base_url": "http://a:1/v1"}},
            "tiers": [{"name": "moe", "backend": "v"}, {"name": "moe2", "backend": "v"}],
            "ledger": {"kind": "redis", "url": "redis://r:6379/0"}}
    assert missing_extras(data, ABSENT) == [
        "tiers 'moe', 'moe2' use backend 'v' (kind vllm, managed), which needs vllm: "
        "pip install 'joulegate[vllm]' (or set managed.python to a Python that has vLLM)",
        "the ledger (kind redis) needs redis: pip install 'joulegate[redis]'",
    ]


@pytest.mark.unit
def test_the_install_commands_name_extras_that_exist():
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for need in REQUIREMENTS.values():
        assert any(dep.split("[")[0].split("=")[0].split(">")[0] == need.package
                   for dep in extras[need.extra]), need


@pytest.mark.unit
def test_check_policy_prints_the_install_line_not_a_traceback(valid: Path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were absent
    assert main(["check-policy", str(valid)]) == 1
    err = capsys.readouterr().err
    assert err == (f"{valid}: tier 'small' uses backend 'qwen-0.5b' (kind llamacpp), which needs "
                   "llama-cpp-python: pip install 'joulegate[llamacpp]'\n"
                   f"{valid}: backend 'spare' (kind llamacpp, used by no tier) needs "
                   "llama-cpp-python: pip install 'joulegate[llamacpp]'\n")
    monkeypatch.undo()  # installed again
    assert main(["check-policy", str(valid)]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.unit
def test_serve_refuses_to_start_with_the_install_line(valid: Path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were absent
    assert main(["serve", "--policy", str(valid), "--port", "1"]) == 2  # before any bind
    err = capsys.readouterr().err
    assert err.startswith("joulegate: tier 'small' uses backend 'qwen-0.5b' (kind llamacpp), "
                          "which needs llama-cpp-python: pip install 'joulegate[llamacpp]'\n")
    assert "Traceback" not in err
