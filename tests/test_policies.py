"""Policy validation: each class of mistake gives its own message with file and key path."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from policies import DEFAULT_POLICY_PATH, PolicyError, key_digest, load_policy, parse_policy

# Marked test by test: the unit ones start no process and open no socket.

BASE = {
    "version": 1,
    "backends": {"up": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
    "tiers": [
        {"name": "big", "backend": "up", "model": "big-model", "cost": 2},
        {"name": "small", "backend": "up", "model": "small-model", "cost": 1},
    ],
    "tenants": {"acme": {"keys": ["sha256:" + key_digest("k1")], "default_tier": "small"}},
}


def issues(mutate) -> list[str]:
    data = copy.deepcopy(BASE)
    mutate(data)
    with pytest.raises(PolicyError) as info:
        parse_policy(data, "p.yaml")
    assert info.value.source == "p.yaml"
    return [str(i) for i in info.value.issues]


@pytest.mark.unit
def test_valid_policy_orders_tiers_by_cost():
    policy = parse_policy(copy.deepcopy(BASE))
    assert [t.name for t in policy.ordered_tiers()] == ["small", "big"]
    assert [t.name for t in policy.tenant_tiers("acme")] == ["small", "big"]


@pytest.mark.unit
def test_shipped_default_policy_is_valid():
    policy = load_policy(DEFAULT_POLICY_PATH)
    assert [t.name for t in policy.ordered_tiers()] == ["embed", "small", "full"]
    assert {b.kind for b in policy.backends.values()} == {"llamacpp", "wordllama"}


@pytest.mark.unit
def test_the_benchmark_run_policies_stay_valid():
    """The policies a reported benchmark run used (benchmarks/run-policies/) still load, so the
    README's command reproduces the run."""
    root = DEFAULT_POLICY_PATH.parent.parent / "benchmarks" / "run-policies"
    policy = load_policy(root / "cascade-iq4.yaml")
    assert policy.backends["qwen-0.5b"].model == "qwen2.5-coder-0.5b-instruct-iq4_nl"
    assert policy.routing.estimator == "cascade" and policy.routing.thresholds is None


@pytest.mark.unit
def test_unknown_key_names_path_and_allowed_keys():
    found = issues(lambda d: d["backends"]["up"].update(timeout=3))
    assert len(found) == 1
    assert found[0].startswith("backends.up.timeout: unknown key; expected one of: kind, base_url")


@pytest.mark.unit
def test_unknown_top_level_key():
    (found,) = issues(lambda d: d.update(tennants={}))
    # Later sections (sites, batches, ...) follow routing in the list.
    assert found.startswith(
        "tennants: unknown key; expected one of: version, state_dir, server, admin, ledger, "
        "backends, tiers, tenants, routing, sites")
    assert found.endswith(" (did you mean 'tenants'?)")


@pytest.mark.unit
def test_missing_key():
    assert issues(lambda d: d["tiers"][0].pop("cost")) == ["tiers[0].cost: required key is missing"]


@pytest.mark.unit
def test_wrong_type_and_range():
    found = issues(lambda d: d.update(server={"port": "http", "max_body_bytes": 10}))
    assert any(f.startswith("server.port: ") and "valid integer" in f and "'http'" in f for f in found)
    assert any(f.startswith("server.max_body_bytes: ") and "greater than or equal to 1024" in f
               for f in found)


@pytest.mark.unit
def test_unknown_backend_kind():
    found = issues(lambda d: d["backends"].update(x={"kind": "tgi"}))
    assert found == ["backends.x: unknown backend kind 'tgi'; expected one of: 'llamacpp', 'openai', 'vllm', 'wordllama'"]


@pytest.mark.unit
def test_plain_key_is_refused():
    found = issues(lambda d: d["tenants"]["acme"]["keys"].append("sk-secret"))
    assert len(found) == 1 and found[0].startswith("tenants.acme.keys[1]: a key must be written as")
    assert "sk-secret" not in found[0]


@pytest.mark.unit
def test_reference_errors_are_all_reported():
    def mutate(d):
        d["tiers"][0]["backend"] = "nope"
        d["tenants"]["acme"]["tiers"] = ["small", "huge"]
        d["tenants"]["acme"]["default_tier"] = "big"

    found = issues(mutate)
    assert "tiers[0].backend: unknown backend 'nope'; expected one of: up" in found
    assert "tenants.acme.tiers[1]: unknown tier 'huge'; expected one of: small, big" in found
    assert any(f.startswith("tenants.acme.default_tier: 'big' is not one of") for f in found)


@pytest.mark.unit
def test_duplicate_tier_and_shared_key_and_reserved_name():
    def mutate(d):
        d["tiers"].append({"name": "small", "backend": "up", "model": "auto", "cost": 3})
        d["tenants"]["other"] = {"keys": d["tenants"]["acme"]["keys"], "default_tier": "small"}

    found = issues(mutate)
    assert "tiers[2]: 'auto' is reserved for gateway routing" in found
    assert "tiers[2].name: duplicate tier name 'small'" in found
    assert any(f.startswith("tenants.other.keys[0]: the same key is also given to tenant 'acme'")
               for f in found)


@pytest.mark.unit
def test_file_errors(tmp_path: Path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("version: 1\nversion: 1\n")
    with pytest.raises(PolicyError) as info:
        load_policy(dup)
    assert f"{dup}:2:1: version: duplicate key 'version' (first given on line 1)" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [1\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="cannot read file"):
        load_policy(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(PolicyError, match="must be a YAML mapping"):
        load_policy(scalar)


def _cli(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, env=env, input=stdin, timeout=60, check=False)


@pytest.mark.e2e
def test_check_policy_cli(tmp_path: Path, monkeypatch):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    ok = _cli("check-policy", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout and "small (small-model on up)" in ok.stdout
    data = copy.deepcopy(BASE)
    data["tenants"]["acme"]["keys"] = ["env:JG_TEST_UNSET_KEY"]
    data["backends"]["local"] = {"kind": "llamacpp", "model": "/nonexistent/model.gguf"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    out = _cli("check-policy", str(bad))
    assert out.returncode == 1
    assert "JG_TEST_UNSET_KEY is unset" in out.stderr
    data["tenants"]["acme"]["keys"] = BASE["tenants"]["acme"]["keys"]
    bad.write_text(yaml.safe_dump(data))
    out = _cli("check-policy", str(bad))
    assert out.returncode == 1
    assert "backends.local.model: '/nonexistent/model.gguf' is neither a catalog model" in out.stderr


@pytest.mark.e2e
def test_keys_hash_cli():
    out = _cli("keys", "hash", "sk-abc")
    assert out.stdout.strip() == "sha256:" + key_digest("sk-abc")
    piped = _cli("keys", "hash", "-", stdin="sk-abc\n")
    assert piped.stdout.strip() == "sha256:" + key_digest("sk-abc")
    fresh = _cli("keys", "hash").stdout.split()
    key, digest = fresh[1], fresh[3]
    assert key.startswith("sk-jg-") and digest == "sha256:" + key_digest(key)
