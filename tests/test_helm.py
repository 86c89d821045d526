"""The Helm chart, checked with the real tools: ``helm lint``, ``helm template``, the chart's
values schema, Kubernetes' own JSON schemas (kubernetes-validate, offline), promtool for the
PrometheusRule, and joulegate's own policy loader for the policy the chart renders.

helm comes from ``scripts/helm-install`` (``.tools/bin/helm``), which the test command runs.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from policies import load_policy

pytestmark = [pytest.mark.e2e, pytest.mark.ops]

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "joulegate"
FULL = ROOT / "tests" / "helm" / "values-full.yaml"
HELM = ROOT / ".tools" / "bin" / "helm"
K8S_VERSION = "1.31.0"
#: CRDs Kubernetes' schemas do not cover; checked below by what they must contain.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run scripts/helm-install (scripts/test does)")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=check,
                          timeout=120)


def render(*values: str | Path, sets: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", "jg", str(CHART), "--namespace", "llm"]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def write_values(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("values", [[], [FULL]], ids=["defaults", "everything-on"])
def test_lint_and_render_validate_against_kubernetes_schemas(values):
    import kubernetes_validate

    lint = helm("lint", "--strict", str(CHART), *[a for v in values for a in ("-f", str(v))],
                check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(*values)
    kinds = {d["kind"] for d in docs}
    core = [d for d in docs if d["kind"] not in OPERATOR_KINDS]
    for doc in core:
        # strict: an unknown field anywhere is an error, not silently dropped by the API server
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    if values:
        assert kinds >= {"Deployment", "Service", "ServiceAccount", "ConfigMap", "Secret",
                         "StatefulSet", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                         "ServiceMonitor", "PrometheusRule"}
        assert len(by_kind(docs, "Deployment")) == 4  # gateway, llama.cpp, vLLM MoE, dense
    else:
        assert kinds == {"Deployment", "Service", "ServiceAccount", "ConfigMap", "Secret"}


def test_the_validator_rejects_a_broken_manifest():
    """The schema check above can fail: a misspelt field in a rendered Deployment is caught."""
    import kubernetes_validate

    deployment = one(render(), "Deployment", "jg-joulegate")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_gateway_deployment_probes_rollout_and_keys():
    docs = render()
    dep = one(docs, "Deployment", "jg-joulegate")
    pod = dep["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["args"][:2] == ["serve", "--policy=/etc/joulegate/policy.yaml"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert container["envFrom"] == [{"secretRef": {"name": "jg-joulegate-keys"}}]
    # The Service reaches the pods, by label and by port name.
    svc = one(docs, "Service", "jg-joulegate")
    labels = pod["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    # Generated keys: one per env: reference of the default policy, each a real secret.
    secret = one(docs, "Secret", "jg-joulegate-keys")
    keys = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(keys) == {"JOULEGATE_ADMIN_KEY", "JOULEGATE_DEMO_KEY", "JOULEGATE_METRICS_TOKEN"}
    assert all(len(k) >= 40 for k in keys.values())


def test_metrics_need_the_secrets_token_and_the_service_monitor_sends_it(tmp_path):
    docs = render(FULL)
    policy = yaml.safe_load(one(docs, "ConfigMap", "jg-joulegate-policy")["data"]["policy.yaml"])
    assert policy["server"]["metrics_token"] == "env:JOULEGATE_METRICS_TOKEN"
    endpoint = one(docs, "ServiceMonitor", "jg-joulegate")["spec"]["endpoints"][0]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {
        "name": "jg-joulegate-keys", "key": "JOULEGATE_METRICS_TOKEN"}}
    secret = one(docs, "Secret", "jg-joulegate-keys")
    assert "JOULEGATE_METRICS_TOKEN" in secret["data"]
    # Switched off: metrics open, the ServiceMonitor sends nothing.
    docs = render(FULL, sets=("secret.metricsTokenKey=",))
    policy = yaml.safe_load(one(docs, "ConfigMap", "jg-joulegate-policy")["data"]["policy.yaml"])
    assert "metrics_token" not in policy["server"]
    assert "authorization" not in one(docs, "ServiceMonitor", "jg-joulegate")["spec"]["endpoints"][0]


def test_a_changed_policy_rolls_the_pods(tmp_path):
    def checksum(*values: Path) -> str:
        dep = one(render(*values), "Deployment", "jg-joulegate")
        return dep["spec"]["template"]["metadata"]["annotations"]["checksum/policy"]

    policy = yaml.safe_load((CHART / "files" / "default-policy.yaml").read_text())
    before = checksum()
    # The shipped default given explicitly renders the same policy, so the same checksum.
    assert checksum(write_values(tmp_path, {"policy": policy})) == before
    policy["routing"]["thresholds"]["full"] = 0.6
    assert checksum(write_values(tmp_path, {"policy": policy})) != before


def test_existing_secret_replaces_the_generated_one():
    docs = render(sets=("secret.existingSecret=my-keys",))
    assert not by_kind(docs, "Secret")
    container = one(docs, "Deployment", "jg-joulegate")["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "my-keys"}}]


def test_rendered_policies_load_in_joulegate(tmp_path, monkeypatch):
    """The policy the chart writes into its ConfigMap is one joulegate accepts, with the
    chart's ledger and backends filled in."""
    for var in ("JOULEGATE_ADMIN_KEY", "JOULEGATE_DEMO_KEY", "JOULEGATE_ACME_KEY",
                "JOULEGATE_GLOBEX_KEY"):
        monkeypatch.setenv(var, f"key-{var}")
    policies = {}
    for name, values in (("defaults", []), ("full", [FULL])):
        cm = one(render(*values), "ConfigMap", "jg-joulegate-policy")
        path = tmp_path / f"{name}.yaml"
        path.write_text(cm["data"]["policy.yaml"])
        policies[name] = load_policy(path)
    default, full = policies["defaults"], policies["full"]
    assert set(default.tenants) == {"demo"} and set(full.tenants) == {"acme", "globex"}
    assert "qwen-1.5b" not in full.backends  # a given policy replaces the default whole
    assert default.ledger.kind == "embedded"
    assert (default.server.host, default.server.port) == ("0.0.0.0", 8080)
    assert default.server.metrics_token == "env:JOULEGATE_METRICS_TOKEN"
    assert full.ledger.kind == "redis" and full.ledger.url == "redis://jg-joulegate-redis:6379/0"
    moe = full.backends["vllm-moe"]
    assert moe.kind == "vllm" and moe.base_url == "http://jg-joulegate-vllm-moe:8000/v1"
    assert moe.max_waiting == 8
    assert moe.energy.meter == "prometheus"
    assert moe.energy.prometheus_url == "http://dcgm-exporter.gpu-operator:9400/metrics"
    assert full.backends["vllm-dense"].energy.meter == "auto"  # no exporter given: estimated
    assert full.backends["llamacpp-server"].base_url == "http://jg-joulegate-llamacpp:8080/v1"


def test_external_redis_and_bundled_redis(tmp_path):
    docs = render(sets=("replicaCount=2", "redis.url=redis://redis.shared:6379/3"))
    assert not by_kind(docs, "StatefulSet")
    policy = yaml.safe_load(one(docs, "ConfigMap", "jg-joulegate-policy")["data"]["policy.yaml"])
    assert policy["ledger"] == {"kind": "redis", "url": "redis://redis.shared:6379/3",
                                "on_unavailable": "fail_closed"}
    docs = render(FULL)
    sts = one(docs, "StatefulSet", "jg-joulegate-redis")
    claim = sts["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["resources"]["requests"]["storage"] == "5Gi"
    assert claim["storageClassName"] == "fast-ssd"
    assert one(docs, "Service", "jg-joulegate-redis")["spec"]["ports"][0]["port"] == 6379


def test_gpu_backends_request_gpus_and_the_hpa_scales_on_requests():
    docs = render(FULL)
    dense = one(docs, "Deployment", "jg-joulegate-vllm-dense")
    resources = dense["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 2
    assert "--tensor-parallel-size" in dense["spec"]["template"]["spec"]["containers"][0]["args"]
    hpa = one(docs, "HorizontalPodAutoscaler", "jg-joulegate")
    assert hpa["spec"]["metrics"][0]["type"] == "Pods"
    assert "replicas" not in one(docs, "Deployment", "jg-joulegate")["spec"]  # the HPA owns it
    assert one(docs, "PodDisruptionBudget", "jg-joulegate")["spec"]["minAvailable"] == 2


def test_operator_objects_and_dashboard(tmp_path):
    docs = render(FULL)
    monitors = {d["metadata"]["name"]: d for d in by_kind(docs, "ServiceMonitor")}
    gateway_monitor = monitors["jg-joulegate"]
    svc = one(docs, "Service", "jg-joulegate")
    selector = gateway_monitor["spec"]["selector"]["matchLabels"]
    assert all(svc["metadata"]["labels"][k] == v for k, v in selector.items())
    assert gateway_monitor["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert gateway_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitors["jg-joulegate-dcgm"]["spec"]["namespaceSelector"]["matchNames"] == ["gpu-operator"]
    # The PrometheusRule carries the same rules file, valid for promtool.
    rule = by_kind(docs, "PrometheusRule")[0]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    check = subprocess.run([shutil.which("promtool") or "promtool", "check", "rules",
                            str(rules_file)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    alerts = {r.get("alert") for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"JoulegateBudgetSoftThreshold", "JoulegateTenantRejected", "JoulegateBackendDown",
            "JoulegateJoulesPerTokenRegression"} <= alerts
    dash = one(docs, "ConfigMap", "jg-joulegate-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["joulegate.json"]) == json.loads(
        (CHART / "dashboards" / "joulegate.json").read_text())


@pytest.mark.parametrize("values, message", [
    ({"replicaCount": 0}, "replicaCount: Must be greater than or equal to 1"),
    ({"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy must be one of the following"),
    ({"redis": {"enabeld": True}}, "Additional property enabeld is not allowed"),
    ({"backends": {"vllmMoe": {"gpus": "two"}}}, "backends.vllmMoe.gpus"),
    ({"policy": {"version": 1, "tiers": []}}, "policy"),
    ({"replicaCount": 3}, "needs a shared budget ledger: set redis.enabled=true or redis.url"),
], ids=["replicas", "pull-policy", "typo", "gpus-type", "policy-shape", "ledger"])
def test_bad_values_fail_at_install_with_a_clear_message(tmp_path, values, message):
    result = helm("template", "jg", str(CHART), "-f", str(write_values(tmp_path, values)),
                  check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
