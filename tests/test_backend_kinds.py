"""A backend kind describes itself: one module declares its settings, capabilities and build,
and one registry line lists it. The policy schema, energy metering, the missing-extra lines
and the runtime's build all read the kind from there."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import Field, TypeAdapter, ValidationError

import backends
from backends import (
    KINDS,
    Backend,
    BackendKind,
    BackendRejected,
    BackendUnavailable,
    Capabilities,
    FeatureUnsupported,
    Health,
    Settings,
    llamacpp,
    openai_http,
    vllm,
    wordllama_embed,
)
from gateway.energy import EnergyAccounting
from gateway.preflight import REQUIREMENTS, missing_extras
from gateway.runtime import build_from_kind
from policies import BackendSpec, PolicyError, parse_policy
from policies.schema import backend_union

pytestmark = pytest.mark.unit

KEY = "sha256:" + "ab" * 32


def _policy(backends_: dict) -> dict:
    first = next(iter(backends_))
    return {"version": 1, "backends": backends_,
            "tiers": [{"name": "t", "backend": first, "model": "m", "cost": 1}],
            "tenants": {"acme": {"keys": [KEY], "default_tier": "t"}}}


def _members(union) -> tuple:
    """The models of a ``backends`` union (Annotated[Union[...], discriminator])."""
    return typing.get_args(typing.get_args(union)[0])


# -- the schema is built from the registry ---------------------------------------------------

def test_the_policy_union_is_exactly_the_registrys_kinds():
    members = _members(BackendSpec)
    assert [m.backend_kind for m in members] == list(KINDS.values())
    assert list(KINDS) == ["llamacpp", "openai", "vllm", "wordllama"]  # the order messages list
    for member, kind in zip(members, KINDS.values(), strict=True):
        assert issubclass(member, kind.settings)  # the kind's own defaults and validators
        # site (issue 19) and energy: the gateway's own settings of every backend.
        assert list(member.model_fields) == ["kind", *kind.settings.model_fields, "site",
                                             "energy"]
        assert typing.get_args(member.model_fields["kind"].annotation) == (kind.name,)


def test_each_kind_is_declared_by_its_own_module():
    assert KINDS["llamacpp"] is llamacpp.KIND
    assert KINDS["openai"] is openai_http.KIND
    assert KINDS["vllm"] is vllm.KIND
    assert KINDS["wordllama"] is wordllama_embed.KIND
    features = {"tools": True, "structured_output": True, "logprobs": True, "insertion": True}
    assert llamacpp.KIND.capabilities == Capabilities(streaming=True, local=True,
                                                      prompt_logprobs=True, **features)
    assert openai_http.KIND.capabilities == Capabilities(streaming=True, embeddings=True,
                                                         local=False, **features)
    assert vllm.KIND.capabilities == Capabilities(streaming=True, local=False,
                                                  prompt_logprobs=True, **features)
    assert wordllama_embed.KIND.capabilities == Capabilities(generation=False, embeddings=True,
                                                             local=True)
    caps = wordllama_embed.KIND.capabilities  # an embeddings-only kind generates nothing
    assert not (caps.tools or caps.structured_output or caps.logprobs or caps.insertion)


def test_the_registry_cannot_be_changed_in_place():
    with pytest.raises(TypeError):
        KINDS["echo"] = KINDS["openai"]  # type: ignore[index]


def test_a_policy_entry_builds_its_kinds_backend_with_the_policys_settings():
    policy = parse_policy(_policy({
        "q": {"kind": "llamacpp", "model": "/m.gguf", "n_ctx": 2048, "slots": 3},
        "up": {"kind": "openai", "base_url": "http://u:1/v1/", "timeouts": {"total_s": 9}},
        "v": {"kind": "vllm", "replicas": ["http://a:1/v1", "http://b:1/v1"], "retries": 2,
              "timeouts": {"first_byte_s": 7}},
    }))
    q, up, v = (build_from_kind(name, spec) for name, spec in policy.backends.items())
    assert isinstance(q, llamacpp.LlamaCppBackend) and (q.n_ctx, q.slots) == (2048, 3)
    assert q.queue_timeout_s == 30.0  # the default, declared once in the settings model
    assert isinstance(up, openai_http.OpenAIBackend)
    assert (up.base_url, up.total_s, up.first_byte_s) == ("http://u:1/v1", 9.0, 60.0)
    assert isinstance(v, vllm.VLLMBackend) and v.retries == 2
    assert [r.backend.first_byte_s for r in v.replicas] == [7.0, 7.0]


def test_a_kinds_own_validators_still_apply_in_the_policy():
    with pytest.raises(PolicyError, match="give exactly one of base_url, replicas or managed"):
        parse_policy(_policy({"v": {"kind": "vllm"}}))


# -- without llama.cpp installed ------------------------------------------------------------

@pytest.fixture
def no_llama_cpp(monkeypatch):
    """llama-cpp-python as if not installed: importing it fails, find_spec finds nothing."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)


def test_the_llamacpp_module_imports_without_llama_cpp(no_llama_cpp, monkeypatch):
    path = Path(llamacpp.__file__)
    spec = importlib.util.spec_from_file_location("backends._llamacpp_probe", path)
    module = importlib.util.module_from_spec(spec)
    # As an import does: in sys.modules while it runs (pydantic resolves the settings'
    # annotations, e.g. Literal, in the module's namespace found there).
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # would raise ImportError on a top-level llama_cpp import
    assert module.KIND.settings(model="/m.gguf").n_ctx == 4096


def test_a_policy_naming_llamacpp_loads_without_it_and_names_the_extra(no_llama_cpp):
    data = _policy({"q": {"kind": "llamacpp", "model": "/m.gguf"}})
    policy = parse_policy(data)
    assert missing_extras(policy) == [
        "tier 't' uses backend 'q' (kind llamacpp), which needs llama-cpp-python: "
        "pip install 'joulegate[llamacpp]'"]
    backend = build_from_kind("q", policy.backends["q"])
    with pytest.raises(BackendUnavailable, match=r"pip install 'joulegate\[llamacpp\]'"):
        asyncio.run(backend.start())


def test_the_missing_extra_table_comes_from_the_kinds():
    assert REQUIREMENTS["backend:llamacpp"] is llamacpp.KIND.requirement
    assert REQUIREMENTS["backend:vllm:managed"] is vllm.KIND.requirement
    assert not any(key.startswith("backend:openai") for key in REQUIREMENTS)
    needs = vllm.KIND.needs_requirement
    assert needs({"managed": {"model": "/m"}})
    assert not needs({"managed": {"model": "/m", "python": "/venv/bin/python"}})
    assert not needs({"base_url": "http://a:1/v1"}) and not needs({"managed": "oops"})


# -- adding a kind: one module, one registry line -------------------------------------------

class EchoSettings(Settings):
    """What a new kind's module declares: its settings ..."""

    greeting: str = Field("hello", min_length=1)


class EchoBackend(Backend):
    """... its backend ..."""

    kind = "echo"

    def __init__(self, name: str, settings: EchoSettings):
        super().__init__(name)
        self.greeting = settings.greeting

    async def complete(self, request):
        raise NotImplementedError

    def stream(self, request):
        raise NotImplementedError

    async def health(self) -> Health:
        return Health(True)


#: ... and its descriptor: the one line a registry lists.
ECHO = BackendKind("echo", EchoSettings, Capabilities(), EchoBackend)


def test_a_registry_with_one_more_kind_gives_a_union_that_accepts_it():
    union = TypeAdapter(backend_union([*KINDS.values(), ECHO]))
    spec = union.validate_python({"kind": "echo", "greeting": "hi"})
    assert spec.backend_kind is ECHO and spec.energy.meter == "auto"
    backend = build_from_kind("e", spec)
    assert isinstance(backend, EchoBackend) and backend.greeting == "hi"
    assert union.validate_python({"kind": "openai", "base_url": "http://u:1/v1"}).kind == "openai"
    with pytest.raises(ValidationError, match="greetin"):
        union.validate_python({"kind": "echo", "greetin": "hi"})
    # The real registry and the policy schema are untouched.
    assert "echo" not in KINDS
    with pytest.raises(PolicyError, match="unknown backend kind 'echo'"):
        parse_policy(_policy({"e": {"kind": "echo"}}))


# -- metering follows the kind's capabilities ------------------------------------------------

def _devices(specs: dict) -> dict[str, str]:
    """Backend name → the energy device key accounting picks for it."""
    accounting = EnergyAccounting()
    plan = accounting.prepare(SimpleNamespace(backends=specs))
    try:
        return {name: b.device for name, b in plan.backends.items()}
    finally:
        accounting.discard(plan)


def test_accounting_meters_local_kinds_on_the_host_and_prices_remote_ones(tmp_path):
    no_rapl = {"rapl_root": str(tmp_path / "no-powercap")}  # auto: the CPU-time estimate
    host = KINDS["llamacpp"].capabilities.local
    assert host and not KINDS["openai"].capabilities.local
    local = BackendKind("local-echo", EchoSettings, Capabilities(local=True), EchoBackend)
    remote = BackendKind("remote-echo", EchoSettings, Capabilities(local=False), EchoBackend)
    union = TypeAdapter(backend_union([*KINDS.values(), local, remote]))
    specs = {name: union.validate_python({**entry, "energy": no_rapl}) for name, entry in {
        "q": {"kind": "llamacpp", "model": "/m.gguf"},
        "up": {"kind": "openai", "base_url": "http://u:1/v1"},
        "v": {"kind": "vllm", "base_url": "http://v:1/v1"},
        "here": {"kind": "local-echo"},
        "there": {"kind": "remote-echo"},
    }.items()}
    assert _devices(specs) == {"q": "host-cpu", "up": "tokens:up", "v": "tokens:v",
                               "here": "host-cpu", "there": "tokens:there"}


def test_backends_never_import_gateway_or_policies():
    root = Path(backends.__file__).parent
    for source in root.glob("*.py"):
        text = source.read_text()
        for banned in ("gateway", "policies"):
            assert f"from {banned}" not in text and f"import {banned}" not in text, source


def test_an_upstreams_refused_suffix_says_its_model_cannot_not_that_the_request_is_wrong():
    """A 400 naming ``suffix`` (vLLM's for a model without a FIM renderer) is
    :class:`FeatureUnsupported`, which the gateway hands on to the next tier; any other
    refusal stays a plain :class:`BackendRejected` with the field it names."""
    policy = parse_policy(_policy({"up": {"kind": "openai", "base_url": "http://u:1/v1"}}))
    up = build_from_kind("up", policy.backends["up"])
    assert isinstance(up, openai_http.OpenAIBackend)

    def refusal(param: object) -> Exception:
        body = {"error": {"message": "no FIM here", "type": "BadRequestError", "param": param}}
        return up._status_error(400, json.dumps(body).encode(), "prompt")

    fim = refusal("suffix")
    assert isinstance(fim, FeatureUnsupported) and fim.param == "suffix"
    for param in ("temperature", None, ""):
        other = refusal(param)
        assert isinstance(other, BackendRejected) and not isinstance(other, FeatureUnsupported)
        assert other.param == (param or None)
