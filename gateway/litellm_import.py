"""Convert a LiteLLM proxy config (its ``config.yaml``) into a joulegate policy.

Pure: :func:`convert` takes the parsed YAML and returns the policy's text, with comments,
and one note per thing that did not carry over. What maps to what:

* each ``model_name`` of ``model_list`` becomes a tier (its name made to fit the policy's
  name pattern) with a backend of its own; the tier's ``model`` is the upstream model id
  after the provider prefix (``hosted_vllm/meta-llama/X`` -> ``meta-llama/X``);
* deployments that speak the OpenAI API (``openai/``, ``text-completion-openai/``,
  ``custom_openai/``, ``hosted_vllm/``, ``vllm/`` with ``api_base``, or a bare model with
  ``api_base``) become ``kind: openai`` backends; vLLM ones become ``kind: vllm``, and
  several vLLM deployments of one ``model_name`` (LiteLLM balances them) become its
  ``replicas``;
* ``api_key: os.environ/VAR`` -> ``env:VAR``; ``timeout`` / ``stream_timeout`` (and the
  router's ``timeout`` or ``request_timeout``) -> ``timeouts``;
* ``num_retries`` -> a vllm backend's ``retries``; ``allowed_fails`` / ``cooldown_time``
  -> ``eject_after`` / ``eject_s``;
* ``fallbacks`` -> ``routing.fallback: all``, with a ``fallback_ladder`` when they form
  one chain;
* ``general_settings.master_key`` -> ``admin.keys: ["env:JOULEGATE_ADMIN_KEY"]`` (the key
  itself is never written); one tenant ``default`` with ``env:JOULEGATE_DEMO_KEY`` starts
  on the cheapest tier.

Dollar budgets, callbacks, rate limits, the database and other providers' APIs do not
carry over: each is named in a ``# not converted:`` comment and in :attr:`Conversion.notes`.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any
from urllib.parse import urlsplit

import yaml

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_URL_OK = re.compile(r"^https?://[^\s/]+(/\S*)?$")
_ENV_REF = re.compile(r"^os\.environ/([A-Za-z_][A-Za-z0-9_]*)$")
_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./:+-]*$")
_FLOW_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

OPENAI_URL = "https://api.openai.com/v1"
#: OpenAI's reasoning models, which refuse ``max_tokens`` and read ``max_completion_tokens``
#: (LiteLLM rewrites the field for them by model name).
_REASONING_MODEL = re.compile(r"^(o\d|gpt-5)", re.IGNORECASE)
#: LiteLLM providers that are plain OpenAI API clients of the given ``api_base``.
_OPENAI_PROVIDERS = {"openai", "text-completion-openai", "custom_openai"}
_VLLM_PROVIDERS = {"hosted_vllm", "vllm"}
#: Why some well-known providers do not convert.
_PROVIDER_REASONS = {
    "azure": "Azure OpenAI needs an api-version query and per-deployment URLs; joulegate's "
             "openai backend does not speak Azure's dialect yet",
    "azure_text": "Azure OpenAI needs an api-version query and per-deployment URLs; joulegate's "
                  "openai backend does not speak Azure's dialect yet",
    "anthropic": "Anthropic's Messages API is not OpenAI-compatible; joulegate's HTTP backends "
                 "speak the OpenAI API only",
    "bedrock": "AWS Bedrock signs requests with AWS credentials (SigV4); joulegate's HTTP "
               "backends speak the OpenAI API with a bearer key only",
    "sagemaker": "AWS SageMaker signs requests with AWS credentials (SigV4); joulegate's HTTP "
                 "backends speak the OpenAI API with a bearer key only",
    "vertex_ai": "Vertex AI uses Google credentials and its own API; joulegate's HTTP backends "
                 "speak the OpenAI API with a bearer key only",
    "gemini": "the Gemini API is not the OpenAI API; joulegate's HTTP backends speak the "
              "OpenAI API only",
    "ollama": "Ollama's native API is not the OpenAI API; point an openai backend at Ollama's "
              "OpenAI-compatible endpoint (http://HOST:11434/v1) instead",
    "ollama_chat": "Ollama's native API is not the OpenAI API; point an openai backend at "
                   "Ollama's OpenAI-compatible endpoint (http://HOST:11434/v1) instead",
}
#: Bare model names LiteLLM sends to OpenAI when no provider or api_base is given.
_OPENAI_MODEL = re.compile(r"^(gpt-|chatgpt-|o[1-9](-|$)|davinci|babbage)")
#: model_info.mode values for APIs joulegate does not serve.
_OTHER_MODES = {"embedding", "image_generation", "audio_transcription", "audio_speech",
                "moderation", "rerank"}

#: litellm_params keys that are converted (or deliberately used) rather than reported.
_USED_PARAMS = {"model", "api_base", "api_key", "timeout", "stream_timeout", "order",
                "input_cost_per_token", "output_cost_per_token"}
_PARAM_REASONS = {
    "rpm": "joulegate has no per-backend request rate limits (budgets are joules per tenant)",
    "tpm": "joulegate has no per-backend token rate limits (budgets are joules per tenant)",
    "max_parallel_requests": "a vllm backend's max_waiting skips a tier while its queue is "
                             "long; there is no fixed cap on parallel requests",
    "weight": "replicas are balanced by outstanding requests, not by weights",
    "api_version": "joulegate's openai backend sends no api-version",
}

_BUDGET_WINDOWS = {"1m": "1m", "60s": "1m", "1h": "1h", "60m": "1h", "1d": "1d", "24h": "1d",
                   "7d": "7d", "30d": "30d", "1mo": "calendar-month"}


@dataclass(frozen=True)
class Conversion:
    """The policy text and one line per thing that did not carry over or needs a look."""

    text: str
    notes: list[str]


@dataclass
class _Deployment:
    index: int
    group: str
    provider: str
    upstream: str
    vllm: bool
    base_url: str
    order: float
    params: Mapping[str, Any]
    info: Mapping[str, Any]
    api_key: str | None = None
    comments: list[str] = field(default_factory=list)  # about its URL, in the output
    key_comments: list[str] = field(default_factory=list)  # about its api_key


@dataclass
class _Tier:
    name: str
    group: str
    deployments: list[_Deployment]
    cost: float = 1.0

    @property
    def primary(self) -> _Deployment:
        return self.deployments[0]


def _one_line(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return " ".join(str(value).split())


def _scalar(value: Any, flow: bool = False) -> str:
    """A YAML scalar: plain where that reads back as the same string, else JSON-quoted."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return _num(value)
    text = str(value)
    pattern = _FLOW_PLAIN if flow else _PLAIN
    if pattern.match(text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text)


def _num(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def _flow_list(values: list[Any]) -> str:
    return "[" + ", ".join(_scalar(v, flow=True) for v in values) + "]"


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def sanitize_name(name: str) -> str:
    """A LiteLLM model_name made to fit the policy's name pattern."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).lstrip("._-")[:64].rstrip("-")
    if not text:
        text = "model"
    if text.lower() == "auto":  # reserved: `model: "auto"` asks the gateway to choose
        text = f"{text}-tier"
    return text


class _Converter:
    def __init__(self, config: Mapping[str, Any], environ: Mapping[str, str]):
        self.config = config
        self.environ = environ
        self.notes: list[str] = []  # "not converted" and "check" lines, for stderr
        self.unconverted: list[str] = []  # the "# not converted:" lines at the end
        self.router = self._section("router_settings")
        self.settings = self._section("litellm_settings")
        self.general = self._section("general_settings")
        self.costs_from_prices = False

    # -- helpers --------------------------------------------------------------------------

    def _section(self, key: str) -> Mapping[str, Any]:
        value = self.config.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self._skip(f"{key}: not a mapping")
            return {}
        return value

    def _skip(self, text: str) -> None:
        self.unconverted.append(text)
        self.notes.append(f"not converted: {text}")

    def _check(self, text: str) -> None:
        self.notes.append(f"check: {text}")

    def _setting(self, key: str) -> tuple[Any, str] | None:
        """A router setting, from router_settings first, then litellm_settings."""
        for where, section in (("router_settings", self.router), ("litellm_settings", self.settings)):
            if section.get(key) is not None:
                return section[key], f"{where}.{key}"
        return None

    def _env_url(self, value: str, where: str) -> tuple[str, list[str]]:
        m = _ENV_REF.match(value)
        if not m:
            return value, []
        var = m.group(1)
        if self.environ.get(var):
            return self.environ[var], [f"api_base from ${var} when this policy was made"]
        placeholder = f"http://{var.lower().replace('_', '-')}.invalid/v1"
        self._check(f"{where}: LiteLLM read api_base from ${var}, which is unset here; "
                    f"replace the placeholder {placeholder} with the URL")
        return placeholder, [f"TODO: LiteLLM read this URL from ${var} (unset when converted): "
                             "write the URL here"]

    # -- model_list ---------------------------------------------------------------------

    def _deployment(self, index: int, entry: Any) -> _Deployment | None:
        where = f"model_list[{index}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("litellm_params"), Mapping):
            self._skip(f"{where}: no litellm_params")
            return None
        group = entry.get("model_name")
        params = entry["litellm_params"]
        given_info = entry.get("model_info")
        info: Mapping[str, Any] = given_info if isinstance(given_info, Mapping) else {}
        model = params.get("model")
        if not group or not isinstance(model, str) or not model:
            self._skip(f"{where}: needs model_name and litellm_params.model")
            return None
        group = str(group)
        label = f"{where} {group} ({model})"
        if "*" in group or "*" in model:
            self._skip(f"{label}: wildcard routing passes any model name to a provider; "
                       "joulegate serves named tiers")
            return None
        if info.get("mode") in _OTHER_MODES:
            self._skip(f"{label}: mode {info['mode']}; joulegate serves chat and text "
                       "completions only")
            return None
        provider, _, rest = model.partition("/")
        api_base = params.get("api_base")
        if not rest or provider not in (_OPENAI_PROVIDERS | _VLLM_PROVIDERS | set(_PROVIDER_REASONS)):
            # A bare model id served by an OpenAI-compatible api_base, or an OpenAI model's.
            if api_base or (not rest and _OPENAI_MODEL.match(model)):
                provider, rest = "openai", model
            elif rest:
                self._skip(f"{label}: provider '{provider}' is not converted; joulegate's HTTP "
                           "backends speak the OpenAI API (if the provider offers an "
                           "OpenAI-compatible endpoint, point an openai backend at it)")
                return None
            else:
                self._skip(f"{label}: LiteLLM infers this model's provider from its name; "
                           "write it as openai/... or hosted_vllm/... with api_base")
                return None
        if provider in _PROVIDER_REASONS:
            self._skip(f"{label}: {_PROVIDER_REASONS[provider]}")
            return None
        vllm = provider in _VLLM_PROVIDERS
        comments: list[str] = []
        if api_base is not None and not isinstance(api_base, str):
            self._skip(f"{label}: api_base is not a string")
            return None
        if not api_base:
            if provider == "vllm":
                self._skip(f"{label}: vllm/ without api_base runs vLLM inside LiteLLM; a vllm "
                           "backend with managed: makes joulegate launch and supervise one")
                return None
            if vllm or provider == "custom_openai":
                self._skip(f"{label}: no api_base (LiteLLM took it from its environment); "
                           "give the server's URL")
                return None
            api_base = OPENAI_URL
        api_base, env_comments = self._env_url(api_base.strip(), label)
        comments += env_comments
        base_url = api_base.rstrip("/")
        if vllm and urlsplit(base_url).path == "":
            base_url += "/v1"
            comments.append("/v1 added: vLLM serves the OpenAI API under /v1, and a base_url "
                            "includes that prefix")
        if not _URL_OK.match(base_url):
            self._skip(f"{label}: api_base {base_url!r} is not an http(s) URL")
            return None
        order = _number(params.get("order"))
        dep = _Deployment(index, group, provider, rest, vllm, base_url,
                          order if order is not None else float("inf"), params, info,
                          comments=comments)
        self._api_key(dep, label)
        for key in params:
            if key in _USED_PARAMS:
                continue
            reason = _PARAM_REASONS.get(key, "default request parameters and provider options "
                                             "are not set per backend in joulegate")
            self._skip(f"{label}: litellm_params.{key}: {reason}")
        return dep

    def _api_key(self, dep: _Deployment, label: str) -> None:
        key = dep.params.get("api_key")
        if key is None or key == "":
            if dep.base_url == OPENAI_URL:
                dep.api_key = "env:OPENAI_API_KEY"
                dep.key_comments.append("LiteLLM's default key for OpenAI: $OPENAI_API_KEY")
            return
        m = _ENV_REF.match(str(key))
        if m:
            dep.api_key = f"env:{m.group(1)}"
            return
        dep.api_key = str(key)
        dep.key_comments.append("a literal key: better `api_key: env:VAR` with the key in $VAR")
        self._check(f"{label}: api_key is written literally; better env:VAR")

    def _tiers(self) -> list[_Tier]:
        model_list = self.config.get("model_list")
        if not isinstance(model_list, list) or not model_list:
            self._skip("model_list: missing or empty; the policy below has no tier")
            return []
        groups: dict[str, list[_Deployment]] = {}
        for index, entry in enumerate(model_list):
            if isinstance(entry, Mapping) and entry.get("model_name") is not None:
                groups.setdefault(str(entry["model_name"]), [])
            dep = self._deployment(index, entry)
            if dep is not None:
                groups[dep.group].append(dep)
        tiers: list[_Tier] = []
        used: set[str] = set()
        for group, deps in groups.items():
            if not deps:
                continue
            deps.sort(key=lambda d: (d.order, d.index))
            primary = deps[0]
            if primary.vllm:
                chosen = [d for d in deps if d.vllm and d.upstream == primary.upstream]
            else:
                chosen = [primary]
            for d in deps:
                if d in chosen:
                    continue
                if primary.vllm and d.vllm:
                    why = (f"serves {d.upstream}, not {primary.upstream}; a vllm backend's "
                           "replicas serve one model")
                elif primary.vllm:
                    why = "a vllm backend's replicas are vLLM servers; this one is not"
                else:
                    why = ("joulegate balances several servers of one model only as the "
                           "replicas of a kind: vllm backend; if these are vLLM servers, make "
                           "this backend kind: vllm and list them under replicas")
                self._skip(f"model_list[{d.index}] {group} ({d.provider}/{d.upstream}): "
                           f"LiteLLM balanced it with model_list[{primary.index}]; {why}")
            name = base = sanitize_name(group)
            n = 2
            while name in used:
                name = f"{base[:60]}-{n}"
                n += 1
            used.add(name)
            tiers.append(_Tier(name, group, chosen))
        # A pinned model must name one tier, and must not be another tier's name.
        kept: list[_Tier] = []
        models: dict[str, str] = {}
        for tier in tiers:
            model = tier.primary.upstream
            if model == "auto":
                self._skip(f"model_name {tier.group}: its upstream model is named 'auto', which "
                           "joulegate reserves for choosing the tier")
                continue
            if model in models:
                self._skip(f"model_name {tier.group}: the same upstream model as tier "
                           f"'{models[model]}'; clients can send model '{models[model]}' instead")
                continue
            if model != tier.name and model in used:
                self._skip(f"model_name {tier.group}: its upstream model '{model}' is another "
                           "tier's name, so a request for it would be ambiguous")
                continue
            models[model] = tier.name
            kept.append(tier)
        self._costs(kept)
        return kept

    def _costs(self, tiers: list[_Tier]) -> None:
        prices: list[float | None] = []
        for tier in tiers:
            p = tier.primary
            costs = [_number(p.info.get(k, p.params.get(k)))
                     for k in ("input_cost_per_token", "output_cost_per_token")]
            known = [c for c in costs if c is not None]
            prices.append(sum(known) if len(known) == len(costs) else None)
        positive = [p for p in prices if p is not None and p > 0]
        self.costs_from_prices = bool(tiers) and len(positive) == len(prices)
        if self.costs_from_prices:
            cheapest = min(positive)
            for tier, price in zip(tiers, positive, strict=True):
                tier.cost = float(f"{price / cheapest:.3g}")
        else:
            for i, tier in enumerate(tiers, 1):
                tier.cost = float(i)

    # -- settings -------------------------------------------------------------------------

    def _timeouts(self, dep: _Deployment) -> tuple[str | None, list[str]]:
        total = _number(dep.params.get("timeout"))
        if total is None:
            found = self._setting("timeout") or (
                (self.settings["request_timeout"], "litellm_settings.request_timeout")
                if self.settings.get("request_timeout") is not None else None)
            total = _number(found[0]) if found else None
        stream = _number(dep.params.get("stream_timeout"))
        comments: list[str] = []
        if total is not None and total > 0:
            first, whole = min(total, 3600.0), total
            if total > 86400:
                comments.append(f"LiteLLM's timeout {_num(total)} s is above joulegate's "
                                "limit of 86400 s")
                whole = 86400.0
            if stream is not None:
                comments.append(f"LiteLLM's stream_timeout {_num(stream)} s is not used: "
                                "first_byte_s also bounds a whole non-streaming answer, so it is "
                                "kept at the timeout; lower it if your requests stream")
        elif stream is not None and stream > 0:
            first = min(stream, 3600.0)
            whole = max(600.0, first)
            comments.append("first_byte_s from LiteLLM's stream_timeout; it also bounds a whole "
                            "non-streaming answer")
        else:
            return None, comments
        return f"{{first_byte_s: {_num(first)}, total_s: {_num(whole)}}}", comments

    def _reliability(self) -> list[tuple[str, str, str]]:
        """(key, value, comment) for every vllm backend."""
        out = []
        found = self._setting("num_retries")
        number = _number(found[0]) if found else None
        if found and number is not None:
            value = int(min(max(number, 0), 10))
            capped = "" if value == number else f" ({_num(number)} capped " \
                "to joulegate's most, 10)"
            out.append(("retries", str(value), f"{found[1]}{capped}: on another replica, before "
                        "the first byte only"))
        found = self._setting("allowed_fails")
        number = _number(found[0]) if found else None
        if found and number is not None:
            value = int(min(max(number + 1, 1), 1000))
            out.append(("eject_after", str(value), f"{found[1]} {_num(number)}: the "
                        "next failure in a row ejects the replica (LiteLLM counts per minute)"))
        found = self._setting("cooldown_time")
        number = _number(found[0]) if found else None
        if found and number is not None and number <= 0:
            self._skip(f"{found[1]} {_one_line(found[0])}: joulegate always ejects a failing "
                       "replica for eject_s (30 s unless set)")
        elif found and number is not None:
            out.append(("eject_s", _num(min(number, 3600.0)),
                        f"{found[1]}; joulegate doubles it while the replica keeps failing"))
        return out

    def _fallbacks(self, tiers: list[_Tier]) -> tuple[list[str], list[str] | None, bool]:
        """(comments, ladder or None, whether any fallback converted)."""
        by_group = {t.group: t.name for t in tiers}
        chains: list[list[str]] = []
        for where, section in (("router_settings", self.router), ("litellm_settings", self.settings)):
            entries = section.get("fallbacks")
            if entries is None:
                continue
            if not isinstance(entries, list):
                self._skip(f"{where}.fallbacks: expected a list like [{{model-a: [model-b]}}]")
                continue
            for entry in entries:
                if not isinstance(entry, Mapping):
                    self._skip(f"{where}.fallbacks: entry {_one_line(entry)!r} is not a mapping")
                    continue
                for source, targets in entry.items():
                    targets = targets if isinstance(targets, list) else [targets]
                    chain = []
                    for name in [source, *targets]:
                        name = str(name)
                        if name in by_group:
                            chain.append(by_group[name])
                        else:
                            self._skip(f"{where}.fallbacks: {source} -> {name}: '{name}' is not "
                                       "a converted model_name, so it was left out")
                    if len(chain) > 1:
                        chains.append(chain)
        if not chains:
            return [], None, False
        successor: dict[str, str] = {}
        predecessor: dict[str, str] = {}
        simple = True
        for chain in chains:
            for a, b in pairwise(chain):
                if a == b:
                    continue
                if successor.get(a, b) != b or predecessor.get(b, a) != a:
                    simple = False
                successor.setdefault(a, b)
                predecessor.setdefault(b, a)
        starts = [t for t in successor if t not in predecessor]
        ladder: list[str] = []
        if simple and len(starts) == 1:
            node: str | None = starts[0]
            while node is not None and node not in ladder:
                ladder.append(node)
                node = successor.get(node)
            simple = node is None and len(ladder) == len(set(successor) | set(predecessor))
        else:
            simple = False
        if simple:
            return ["LiteLLM's fallbacks, one chain: a tier that cannot answer hands the request "
                    "to the next"], ladder, True
        self._skip("fallbacks: they do not form one chain (joulegate has one fallback ladder); "
                   "the default ladder, the tenant's tiers from costliest down, is used")
        return ["LiteLLM's fallbacks are not one chain: see `not converted` below"], None, True

    def _settings_notes(self) -> None:
        for key, value in self.settings.items():
            if key in ("fallbacks", "num_retries", "allowed_fails", "cooldown_time",
                       "request_timeout", "max_budget", "budget_duration"):
                continue
            if key == "drop_params":
                self._skip(f"litellm_settings.drop_params {_one_line(value)}: joulegate will "
                           "decide per tenant which unsupported parameters to drop; until then "
                           "upstreams get the OpenAI parameters clients send")
            elif key in ("callbacks", "success_callback", "failure_callback", "service_callbacks"):
                names = ", ".join(_one_line(v) for v in value) if isinstance(value, list) else _one_line(value)
                self._skip(f"litellm_settings.{key} [{names}]: joulegate has no logging "
                           "callbacks; it exports Prometheus metrics at /metrics and one JSON "
                           "access-log line per request")
            elif key in ("context_window_fallbacks", "content_policy_fallbacks", "default_fallbacks"):
                self._skip(f"litellm_settings.{key}: joulegate falls back only when a tier "
                           "cannot take a request (down, overloaded, too slow)")
            elif key in ("set_verbose", "json_logs", "telemetry", "turn_off_message_logging"):
                self._skip(f"litellm_settings.{key}: LiteLLM's own logging and telemetry; joulegate logs one "
                           "line per request and never prompt text (`joulegate serve --help`)")
            elif key == "cache":
                self._skip("litellm_settings.cache: joulegate caches no responses")
            else:
                self._skip(f"litellm_settings.{key}: no joulegate equivalent")
        if self.settings.get("max_budget") is not None or self.settings.get("budget_duration"):
            self._skip(f"litellm_settings.max_budget {_one_line(self.settings.get('max_budget'))} "
                       f"per {_one_line(self.settings.get('budget_duration') or 'ever')}: dollars; "
                       "joulegate budgets are joules per tenant (see the tenant below)")
        for key in self.router:
            if key in ("fallbacks", "num_retries", "allowed_fails", "cooldown_time", "timeout"):
                continue
            if key == "routing_strategy":
                self._skip(f"router_settings.routing_strategy {_one_line(self.router[key])}: "
                           "joulegate sends each request to the replica with the fewest "
                           "outstanding requests, and `model: \"auto\"` to a tier by difficulty")
            elif key.startswith("redis_"):
                self._skip(f"router_settings.{key}: joulegate shares only its budget ledger "
                           "(ledger: kind: redis, url: ...)")
            else:
                self._skip(f"router_settings.{key}: no joulegate equivalent")
        for key in self.general:
            if key == "master_key":
                continue
            if key == "database_url":
                self._skip("general_settings.database_url: joulegate has no database; keys live "
                           "in the policy and budget spend in its ledger (SQLite or Redis)")
            else:
                self._skip(f"general_settings.{key}: no joulegate equivalent")
        for key in self.config:
            if key in ("model_list", "router_settings", "litellm_settings", "general_settings"):
                continue
            if key == "environment_variables" and isinstance(self.config[key], Mapping):
                names = ", ".join(str(k) for k in self.config[key])
                self._skip(f"environment_variables ({names}): set them in the gateway's "
                           "environment; their values are not copied")
            else:
                self._skip(f"{key}: no joulegate equivalent")

    # -- output ---------------------------------------------------------------------------

    def run(self) -> Conversion:
        tiers = self._tiers()
        reliability = self._reliability()
        fallback_comments, ladder, has_fallbacks = self._fallbacks(tiers)
        self._settings_notes()
        out: list[str] = []

        def comment(text: str, indent: int = 0, hang: str = "") -> None:
            prefix = " " * indent + "# "
            out.extend(textwrap.wrap(text, 96, initial_indent=prefix,
                                     subsequent_indent=prefix + hang, break_on_hyphens=False))

        comment("A joulegate policy made by `joulegate import-litellm` from a LiteLLM proxy "
                "config. Check it with `joulegate check-policy FILE`; what did not carry over "
                "is listed under `not converted` at the end.")
        out.append("version: 1")
        out.append("")
        out.append("server:")
        comment("LiteLLM's default port, so clients keep their base URL (http://HOST:4000/v1). "
                "LiteLLM listened on all interfaces; add `host: 0.0.0.0` for that.", 2)
        out.append("  port: 4000")

        master = self.general.get("master_key")
        if master:
            out.append("")
            out.append("admin:")
            m = _ENV_REF.match(str(master))
            where = (f"export JOULEGATE_ADMIN_KEY=\"${m.group(1)}\"" if m else
                     "put that key, or a new one from `joulegate keys hash`, in "
                     "$JOULEGATE_ADMIN_KEY")
            comment(f"From general_settings.master_key, which is not copied here: {where}. "
                    "An admin key opens /admin/* only; clients call models with tenant keys.", 2)
            out.append('  keys: ["env:JOULEGATE_ADMIN_KEY"]')
            self.notes.append("check: general_settings.master_key became admin key "
                              "$JOULEGATE_ADMIN_KEY; set that variable")

        out.append("")
        out.append("backends:")
        for tier in tiers:
            p = tier.primary
            if p.vllm:
                what = (f"{len(tier.deployments)} vLLM deployments of model_name {tier.group}, "
                        "which LiteLLM balanced: one replica each" if len(tier.deployments) > 1
                        else f"model_name {tier.group}: a vLLM server")
            else:
                what = f"model_name {tier.group}: {p.provider}/{p.upstream}"
            comment(what, 2)
            out.append(f"  {tier.name}:")
            out.append(f"    kind: {'vllm' if p.vllm else 'openai'}")
            for d in tier.deployments:
                for text in d.comments:
                    comment(text, 4)
            urls = list(dict.fromkeys(d.base_url for d in tier.deployments))
            if p.vllm and len(urls) > 1:
                out.append("    replicas:")
                out.extend(f"      - {_scalar(u)}" for u in urls)
            else:
                out.append(f"    base_url: {_scalar(urls[0])}")
            keys = list(dict.fromkeys(d.api_key for d in tier.deployments))
            if len(keys) > 1:
                comment("LiteLLM used a different key for some replicas; one key serves them "
                        "all here", 4)
                self._check(f"model_name {tier.group}: its replicas had different api_keys; "
                            "the first is used for all")
            for text in dict.fromkeys(c for d in tier.deployments for c in d.key_comments):
                comment(text, 4)
            if keys[0] is not None:
                out.append(f"    api_key: {_scalar(keys[0])}")
            timeouts, notes = self._timeouts(p)
            for text in notes:
                comment(text, 4)
            if timeouts:
                out.append(f"    timeouts: {timeouts}")
            if (not p.vllm and p.base_url == OPENAI_URL
                    and _REASONING_MODEL.match(p.upstream)):
                comment(f"{p.upstream} refuses max_tokens: the limit goes as "
                        "max_completion_tokens (LiteLLM did this by model name)", 4)
                out.append("    max_tokens_field: max_completion_tokens")
            if p.vllm:
                for key, value, text in reliability:
                    comment(text, 4)
                    out.append(f"    {key}: {value}")
        if not tiers:
            comment("no LiteLLM deployment converted: add a backend here", 2)
            out.append("  {}")
        if reliability and any(not t.primary.vllm for t in tiers):
            self._skip(
                "num_retries / allowed_fails / cooldown_time on openai backends: joulegate "
                "retries and ejects replicas of vllm backends; a failing openai backend hands "
                "its requests to the fallback ladder instead")

        out.append("")
        out.append("tiers:")
        if self.costs_from_prices:
            comment("cost: relative energy per token, cheapest lowest. These come from LiteLLM's "
                    "dollar prices per token relative to the cheapest; set real relative energy "
                    "costs.", 2)
        else:
            comment("cost: relative energy per token, cheapest lowest. These follow model_list "
                    "order (1, 2, 3, ...); set real relative energy costs.", 2)
        for tier in tiers:
            if tier.name != tier.group:
                comment(f"LiteLLM's model_name {tier.group!r}: clients now send model "
                        f"'{tier.name}' (or '{tier.primary.upstream}')", 2)
            out.append(f"  - name: {_scalar(tier.name)}")
            out.append(f"    backend: {_scalar(tier.name)}")
            out.append(f"    model: {_scalar(tier.primary.upstream)}")
            out.append(f"    cost: {_num(tier.cost)}")
        if not tiers:
            out.append("  []")

        out.append("")
        out.append("routing:")
        comment("A request that names a tier or model (as with LiteLLM) is served by that tier. "
                "`model: \"auto\"` starts on the tenant's default_tier; give costlier tiers "
                "thresholds to let difficulty routing move hard requests up, e.g. "
                "`thresholds: {TIER: 0.45}` (README, Difficulty routing).", 2)
        if has_fallbacks:
            for text in fallback_comments:
                comment(text, 2)
            comment("`all`: requests that name a model fall back too, as in LiteLLM", 2)
            out.append("  fallback: all")
            if ladder:
                out.append(f"  fallback_ladder: {_flow_list(ladder)}")
        else:
            comment("no LiteLLM fallbacks: only `model: \"auto\"` requests fall back (the "
                    "default)", 2)
            out.append("  fallback: auto")

        out.append("")
        out.append("tenants:")
        comment("One tenant for every client: LiteLLM's virtual keys live in its database and "
                "are not carried over. Put the key clients send in $JOULEGATE_DEMO_KEY, or "
                "replace it with its sha256 form from `joulegate keys hash`.", 2)
        out.append("  default:")
        out.append('    keys: ["env:JOULEGATE_DEMO_KEY"]')
        if tiers:
            cheapest = min(tiers, key=lambda t: t.cost)
            comment("the cheapest tier: `model: \"auto\"` starts here", 4)
            out.append(f"    default_tier: {_scalar(cheapest.name)}")
        budget = self.settings.get("max_budget")
        if budget is not None or self.settings.get("budget_duration"):
            duration = str(self.settings.get("budget_duration") or "30d")
            window = _BUDGET_WINDOWS.get(duration, "30d")
            comment(f"LiteLLM's max_budget was ${_one_line(budget)} per {_one_line(duration)}. "
                    "joulegate budgets joules, not dollars; for example 10 kWh per "
                    f"{window}:", 4)
            out.append(f"    # budgets: [{{window: {window}, joules: 36000000}}]")

        if self.unconverted:
            out.append("")
            comment("---- not converted ----")
            for text in self.unconverted:
                comment(f"not converted: {text}", hang="  ")
        return Conversion("\n".join(out) + "\n", self.notes)


def convert(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Conversion:
    """Convert a parsed LiteLLM proxy config into joulegate policy text.

    ``environ`` resolves ``api_base: os.environ/VAR`` (joulegate needs the URL itself);
    unresolved ones become placeholder URLs with a TODO comment. Raises ``ValueError`` if
    ``config`` is not a mapping.
    """
    if not isinstance(config, Mapping):
        raise ValueError("a LiteLLM config must be a YAML mapping with a model_list")
    return _Converter(config, environ or {}).run()
