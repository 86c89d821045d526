"""`joulegate import-litellm`: a LiteLLM proxy config becomes a policy joulegate loads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from gateway.litellm_import import convert, sanitize_name
from policies import load_policy, parse_policy

#: A LiteLLM proxy config as a team running vLLM next to OpenAI would write it.
LITELLM_CONFIG = textwrap.dedent("""\
    model_list:
      - model_name: qwen-7b                      # a self-hosted OpenAI-compatible server
        litellm_params:
          model: openai/Qwen/Qwen2.5-7B-Instruct
          api_base: http://qwen-7b.internal:8000/v1/
          api_key: sk-local-123
      - model_name: llama-70b                    # two vLLM replicas, balanced by LiteLLM
        litellm_params:
          model: hosted_vllm/meta-llama/Llama-3.1-70B-Instruct
          api_base: http://vllm-70b-0:8000/v1
          api_key: os.environ/VLLM_API_KEY
          timeout: 300
          stream_timeout: 30
          rpm: 600
        model_info:
          id: llama-70b-a
      - model_name: llama-70b
        litellm_params:
          model: hosted_vllm/meta-llama/Llama-3.1-70B-Instruct
          api_base: http://vllm-70b-1:8000
          api_key: os.environ/VLLM_API_KEY
          timeout: 300
        model_info:
          id: llama-70b-b
      - model_name: gpt-4o-mini
        litellm_params:
          model: openai/gpt-4o-mini
          api_key: os.environ/OPENAI_API_KEY
          timeout: 60
      - model_name: claude-sonnet
        litellm_params:
          model: anthropic/claude-3-5-sonnet-20241022
          api_key: os.environ/ANTHROPIC_API_KEY
      - model_name: embed
        litellm_params:
          model: openai/text-embedding-3-small
          api_key: os.environ/OPENAI_API_KEY
        model_info:
          mode: embedding

    router_settings:
      routing_strategy: least-busy
      num_retries: 2
      allowed_fails: 3
      cooldown_time: 45
      timeout: 120
      fallbacks:
        - llama-70b: [gpt-4o-mini, qwen-7b]
        - gpt-4o-mini: [qwen-7b, claude-sonnet]

    litellm_settings:
      drop_params: true
      callbacks: [langfuse]
      success_callback: [prometheus]
      max_budget: 250
      budget_duration: 30d
      request_timeout: 600
      context_window_fallbacks:
        - qwen-7b: [llama-70b]

    general_settings:
      master_key: sk-litellm-master-9f3c
      database_url: postgresql://llm:db-password-42@db:5432/litellm
    """)


def converted(config_text: str = LITELLM_CONFIG, environ=None):
    result = convert(yaml.safe_load(config_text), environ)
    return result, yaml.safe_load(result.text)


@pytest.mark.unit
def test_backends_tiers_and_routing_are_what_a_hand_conversion_gives():
    _, policy = converted()
    assert policy["backends"] == {
        "qwen-7b": {
            "kind": "openai", "base_url": "http://qwen-7b.internal:8000/v1",
            "api_key": "sk-local-123",
            # no timeout of its own: router_settings.timeout wins over request_timeout
            "timeouts": {"first_byte_s": 120, "total_s": 120},
        },
        "llama-70b": {
            "kind": "vllm",
            "replicas": ["http://vllm-70b-0:8000/v1", "http://vllm-70b-1:8000/v1"],
            "api_key": "env:VLLM_API_KEY",
            "timeouts": {"first_byte_s": 300, "total_s": 300},
            "retries": 2,         # num_retries
            "eject_after": 4,     # allowed_fails 3: the 4th failure cools a deployment down
            "eject_s": 45,        # cooldown_time
        },
        "gpt-4o-mini": {
            "kind": "openai", "base_url": "https://api.openai.com/v1",
            "api_key": "env:OPENAI_API_KEY",
            "timeouts": {"first_byte_s": 60, "total_s": 60},
        },
    }
    assert policy["tiers"] == [
        {"name": "qwen-7b", "backend": "qwen-7b", "model": "Qwen/Qwen2.5-7B-Instruct", "cost": 1},
        {"name": "llama-70b", "backend": "llama-70b", "model": "meta-llama/Llama-3.1-70B-Instruct",
         "cost": 2},
        {"name": "gpt-4o-mini", "backend": "gpt-4o-mini", "model": "gpt-4o-mini", "cost": 3},
    ]
    # claude-sonnet is not a tier, so the two fallbacks make one chain without it
    assert policy["routing"] == {"fallback": "all",
                                 "fallback_ladder": ["llama-70b", "gpt-4o-mini", "qwen-7b"]}
    assert policy["tenants"] == {"default": {"keys": ["env:JOULEGATE_DEMO_KEY"],
                                             "default_tier": "qwen-7b"}}
    assert policy["admin"] == {"keys": ["env:JOULEGATE_ADMIN_KEY"]}
    assert policy["server"] == {"port": 4000}


@pytest.mark.unit
def test_the_output_loads_with_joulegates_own_loader(tmp_path):
    result, data = converted()
    path = tmp_path / "policy.yaml"
    path.write_text(result.text)
    policy = load_policy(path)
    assert [t.name for t in policy.ordered_tiers()] == ["qwen-7b", "llama-70b", "gpt-4o-mini"]
    assert policy.backends["llama-70b"].kind == "vllm"
    assert policy.backends["llama-70b"].replicas == ["http://vllm-70b-0:8000/v1",
                                                     "http://vllm-70b-1:8000/v1"]
    assert policy.tenant_routing("default").fallback_ladder == ["llama-70b", "gpt-4o-mini",
                                                                "qwen-7b"]
    assert parse_policy(data) == policy


@pytest.mark.unit
def test_what_does_not_map_is_named_in_comments_and_notes():
    result, _ = converted()
    comments = [line for line in result.text.splitlines() if line.lstrip().startswith("#")]
    unconverted = " ".join(c.strip("# ") for c in comments
                           if "not converted" in c or c.startswith("#   "))
    for what in ("claude-sonnet", "Anthropic", "embed", "mode embedding",
                 "litellm_settings.max_budget 250 per 30d", "dollars",
                 "litellm_settings.callbacks [langfuse]", "success_callback [prometheus]",
                 "general_settings.database_url", "litellm_settings.drop_params",
                 "router_settings.routing_strategy least-busy", "litellm_params.rpm",
                 "context_window_fallbacks", "'claude-sonnet' is not a converted model_name"):
        assert what in unconverted, what
    text = result.text
    assert "a literal key: better `api_key: env:VAR`" in text       # qwen-7b's sk-local-123
    assert "/v1 added" in text                                         # vllm-70b-1 had no /v1
    assert "stream_timeout 30 s is not used" in text
    assert "set real relative energy costs" in text
    assert "# budgets: [{window: 30d, joules: 36000000}]" in text
    # secrets never reach the policy or the notes
    for secret in ("sk-litellm-master-9f3c", "db-password-42"):
        assert secret not in text and not any(secret in n for n in result.notes)
    # each unconverted thing is one line on stderr
    assert all("\n" not in n for n in result.notes)
    assert any(n.startswith("not converted:") and "claude-sonnet" in n for n in result.notes)
    assert any(n.startswith("check:") and "api_key is written literally" in n
               for n in result.notes)
    assert sum("not converted" in n for n in result.notes) == sum(
        c.startswith("# not converted:") for c in comments)


@pytest.mark.unit
def test_prices_in_model_info_become_relative_costs():
    _, policy = converted("""
        model_list:
          - model_name: big
            litellm_params: {model: openai/big-model, api_base: "http://big:8000/v1"}
            model_info: {input_cost_per_token: 0.000003, output_cost_per_token: 0.000015}
          - model_name: small
            litellm_params:
              model: openai/small-model
              api_base: "http://small:8000/v1"
              input_cost_per_token: 0.0000005
              output_cost_per_token: 0.0000015
        """)
    assert [(t["name"], t["cost"]) for t in policy["tiers"]] == [("big", 9), ("small", 1)]
    assert policy["tenants"]["default"]["default_tier"] == "small"
    assert policy["routing"] == {"fallback": "auto"}
    assert "admin" not in policy          # no master key: admin endpoints stay off


@pytest.mark.unit
def test_fallbacks_that_are_not_one_chain_keep_the_default_ladder():
    result, policy = converted("""
        model_list:
          - {model_name: a, litellm_params: {model: hosted_vllm/m-a, api_base: "http://a:8000/v1"}}
          - {model_name: b, litellm_params: {model: hosted_vllm/m-b, api_base: "http://b:8000/v1"}}
          - {model_name: c, litellm_params: {model: hosted_vllm/m-c, api_base: "http://c:8000/v1"}}
        litellm_settings:
          fallbacks: [{a: [c]}, {b: [c]}]
        """)
    assert policy["routing"] == {"fallback": "all"}
    assert "do not form one chain" in result.text
    parse_policy(policy)


@pytest.mark.unit
def test_api_base_from_the_environment_resolves_or_becomes_a_marked_placeholder():
    config = """
        model_list:
          - model_name: m
            litellm_params: {model: openai/m, api_base: os.environ/UPSTREAM_URL}
        """
    _, policy = converted(config, {"UPSTREAM_URL": "http://10.0.0.5:8000/v1"})
    assert policy["backends"]["m"]["base_url"] == "http://10.0.0.5:8000/v1"
    result, policy = converted(config)
    assert policy["backends"]["m"]["base_url"] == "http://upstream-url.invalid/v1"
    assert "TODO: LiteLLM read this URL from $UPSTREAM_URL" in result.text
    assert any("$UPSTREAM_URL" in n for n in result.notes)
    parse_policy(policy)


@pytest.mark.unit
def test_several_openai_deployments_keep_the_first_by_order_and_name_the_rest():
    result, policy = converted("""
        model_list:
          - model_name: gpt-4o
            litellm_params: {model: openai/gpt-4o, api_key: os.environ/KEY_B, order: 2}
          - model_name: gpt-4o
            litellm_params: {model: openai/gpt-4o, api_base: "https://eu.example/v1", order: 1,
                             api_key: os.environ/KEY_A}
          - model_name: gpt-4o-azure
            litellm_params: {model: azure/gpt-4o, api_base: "https://x.openai.azure.com",
                             api_version: "2024-06-01"}
        """)
    assert policy["backends"] == {"gpt-4o": {"kind": "openai", "base_url": "https://eu.example/v1",
                                             "api_key": "env:KEY_A"}}
    assert "model_list[0] gpt-4o (openai/gpt-4o): LiteLLM balanced it with model_list[1]" \
        in " ".join(result.text.split())
    assert "api-version" in result.text  # why azure did not convert
    parse_policy(policy)


@pytest.mark.unit
def test_model_names_are_made_to_fit_the_policy_name_pattern():
    assert sanitize_name("gpt-4o") == "gpt-4o"
    assert sanitize_name("my model/v2 (fast)") == "my-model-v2-fast"
    assert sanitize_name("auto") == "auto-tier"
    assert sanitize_name("__x") == "x"
    assert len(sanitize_name("m" * 100)) == 64
    _, policy = converted("""
        model_list:
          - model_name: "Llama 3 (vLLM)"
            litellm_params: {model: hosted_vllm/llama3, api_base: "http://l:8000/v1"}
        """)
    assert policy["tiers"][0]["name"] == "Llama-3-vLLM"
    parse_policy(policy)


@pytest.mark.unit
def test_a_config_that_is_not_a_mapping_is_refused():
    with pytest.raises(ValueError, match="mapping"):
        convert(["model_list"])  # type: ignore[arg-type]


def joulegate(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, timeout=120, **kw, check=False)


@pytest.mark.e2e
def test_cli_prints_the_policy_on_stdout_and_notes_on_stderr(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(LITELLM_CONFIG)
    run = joulegate("import-litellm", str(config))
    assert run.returncode == 0, run.stderr
    policy = tmp_path / "policy.yaml"
    policy.write_text(run.stdout)
    assert [t.name for t in load_policy(policy).tiers] == ["qwen-7b", "llama-70b", "gpt-4o-mini"]
    notes = run.stderr.splitlines()
    assert notes and all(n.startswith("import-litellm: ") for n in notes)
    assert any("not converted" in n and "claude-sonnet" in n for n in notes)
    assert "sk-litellm-master-9f3c" not in run.stdout + run.stderr
    keys = {"JOULEGATE_ADMIN_KEY": "admin-secret", "JOULEGATE_DEMO_KEY": "client-secret"}
    check = joulegate("check-policy", str(policy), env={**os.environ, **keys})
    assert check.returncode == 0, check.stderr

    nothing = tmp_path / "anthropic-only.yaml"
    nothing.write_text("model_list:\n  - model_name: c\n    litellm_params: {model: anthropic/c}\n")
    run = joulegate("import-litellm", str(nothing))
    assert run.returncode == 1 and "needs editing" in run.stderr


@pytest.mark.unit
def test_openais_reasoning_models_get_max_completion_tokens():
    """LiteLLM sends OpenAI's reasoning models (o1, o3, gpt-5, ...) max_completion_tokens
    by model name; the policy says so on their backend, and only on theirs."""
    result, policy = converted("""
        model_list:
          - model_name: reasoner
            litellm_params: {model: openai/o3-mini, api_key: os.environ/OPENAI_API_KEY}
          - model_name: gpt5
            litellm_params: {model: openai/gpt-5, api_key: os.environ/OPENAI_API_KEY}
          - model_name: chat
            litellm_params: {model: openai/gpt-4o-mini, api_key: os.environ/OPENAI_API_KEY}
          - model_name: local-o1-lookalike
            litellm_params: {model: openai/o1-local, api_base: "http://o1.internal:8000/v1"}
        """)
    fields = {name: b.get("max_tokens_field") for name, b in policy["backends"].items()}
    assert fields == {"reasoner": "max_completion_tokens", "gpt5": "max_completion_tokens",
                      "chat": None, "local-o1-lookalike": None}
    assert "o3-mini refuses max_tokens" in result.text
    parsed = parse_policy(policy)
    assert parsed.backends["reasoner"].max_tokens_field == "max_completion_tokens"
    assert parsed.backends["chat"].max_tokens_field == "max_tokens"
