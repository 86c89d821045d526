"""The policy file's schema: backends, tiers, tenants, server and admin settings.

A backend entry's settings are its kind's own model (:mod:`backends.registry`), to which
the policy adds ``kind`` and ``energy`` (:func:`backend_spec`).

Every model forbids unknown keys, so a typo in a YAML file is an error rather than a
silently ignored setting. Cross references (a tier naming a backend, a tenant naming
tiers) are checked by :func:`reference_issues` on the parsed YAML itself, so that the loader
reports them together with the schema's mistakes, in one pass, each with its key path.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)

from backends import KINDS, BackendKind

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_KEY_REF = re.compile(r"^(sha256:[0-9a-f]{64}|env:[A-Za-z_][A-Za-z0-9_]*)$")

#: The model name that asks the gateway to choose the tier.
AUTO_MODEL = "auto"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def key_digest(key: str) -> str:
    """Hex sha256 of an API key, the only form in which policies store keys."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def resolve_key_ref(ref: str, environ: Mapping[str, str] | None = None) -> str:
    """The sha256 hex digest a key reference stands for.

    ``sha256:<hex>`` is returned as is; ``env:VAR`` hashes the key held in ``$VAR``.
    Raises ``KeyError`` naming the variable when it is unset or empty.
    """
    kind, _, value = ref.partition(":")
    if kind == "sha256":
        return value
    secret = (os.environ if environ is None else environ).get(value)
    if not secret:
        raise KeyError(value)
    return key_digest(secret)


def _check_key_ref(value: str) -> str:
    if not _KEY_REF.match(value):
        raise ValueError(
            "a key must be written as 'sha256:<64 lowercase hex digits>' "
            "(see `joulegate keys hash`) or 'env:VARIABLE'; plain keys are not stored in policies"
        )
    return value


KeyRefStr = Annotated[str, AfterValidator(_check_key_ref)]


class LimitsSpec(_Strict):
    """What a server on the internet must bound. Connection-level limits (the head bytes,
    keep-alive, connections) take effect at start; the others follow reloads."""

    #: The request line and headers together; larger: 431, refused while they arrive.
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1 << 20)
    #: Header fields per request; more: 431.
    max_header_count: int = Field(100, ge=8, le=10_000)
    #: Seconds to receive the whole body once the headers came; slower: 408.
    body_read_timeout_s: float = Field(30.0, gt=0, le=3600)
    #: Seconds an idle keep-alive connection stays open.
    keep_alive_timeout_s: int = Field(5, ge=1, le=3600)
    #: Open connections (and requests in progress) per worker process; beyond: 503 with
    #: Retry-After.
    max_connections: int = Field(1024, ge=1, le=1_000_000)
    #: Requests one tier holds at once (running or queued at its backend), per worker
    #: process; beyond: the next tier of the request's plan, else 503 ``tier_queue_full``
    #: with Retry-After.
    max_pending_per_tier: int = Field(256, ge=1, le=1_000_000)


class UsageLogSpec(_Strict):
    """The usage log (``<state_dir>/usage.jsonl``, what ``joulegate report`` reads): when it
    rotates and how many rotated segments stay. Read when the server starts."""

    #: Size at which the file is renamed ``usage-<UTC time>.jsonl`` and a new one begun.
    max_mb: float = Field(64.0, gt=0, le=1 << 20)
    #: Rotated segments kept; older ones are deleted (0: none kept).
    keep: int = Field(20, ge=0, le=100_000)


class ServerSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    #: Larger request bodies are refused with 413 before they are parsed.
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30)
    #: One structured log line per request (tenant, tier, tokens, latency). Never prompt text.
    access_log: bool = True
    #: Seconds between background health probes of every backend (``joulegate_backend_up``).
    health_interval_s: float = Field(10.0, gt=0, le=3600)
    #: What one client may hold of this server (see :class:`LimitsSpec`).
    limits: LimitsSpec = LimitsSpec()
    #: On SIGTERM: seconds in-flight requests and streams may keep going; streams still
    #: open then get a ``server_shutting_down`` error event and ``[DONE]``.
    shutdown_drain_s: float = Field(10.0, ge=0, le=3600)
    #: Bearer key (``env:VAR`` or ``sha256:``) required by ``GET /metrics`` and for the
    #: details of ``/readyz``; unset: both are open (local use).
    metrics_token: KeyRefStr | None = None
    #: Serve the OpenAPI document at ``GET /openapi.json`` (off: 404).
    openapi: bool = False
    #: The usage log's rotation (see :class:`UsageLogSpec`).
    usage_log: UsageLogSpec = UsageLogSpec()


class AdminSpec(_Strict):
    #: Keys for ``/admin/*``; separate from tenant keys. No keys: admin endpoints answer 404.
    keys: list[KeyRefStr] = Field(default_factory=list)


class EnergySpec(_Strict):
    """How a backend's energy is measured (see docs/energy.md)."""

    #: ``auto``: for a backend that runs in this process (llama.cpp), RAPL when readable,
    #: else estimated from CPU time; for a remote one, prometheus when ``prometheus_url``
    #: is set, else estimated from token prices. ``nvml`` is never picked by ``auto``:
    #: name it for a GPU in this host.
    meter: Literal["auto", "nvml", "rapl", "prometheus", "estimated"] = "auto"
    #: Seconds between meter readings; energy between two readings is split across the
    #: requests active in it.
    interval_s: float = Field(0.5, gt=0, le=60)
    #: Work of one prefill token relative to one generated token, for splitting.
    prefill_weight: float = Field(0.1, ge=0, le=100)
    #: Spread idle energy over the next requests as overhead (it is reported either way).
    spread_idle: bool = False
    #: nvml: GPU indices this backend runs on (tensor parallel: several).
    gpus: list[int] = Field(default_factory=lambda: [0])
    #: rapl: powercap root (for tests and containers that mount it elsewhere).
    rapl_root: str = "/sys/class/powercap"
    #: prometheus: the exporter's /metrics URL and the series to read, e.g.
    #: ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0"}`` (several matches are summed).
    prometheus_url: str | None = None
    prometheus_series: str = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
    #: What the series measures: a cumulative counter in mJ or J, or power in W.
    prometheus_unit: Literal["mJ", "J", "W"] = "mJ"
    #: estimated, in-process: watts drawn per fully busy CPU core, and a constant idle draw.
    watts_per_core: float = Field(12.0, ge=0, le=1000)
    idle_watts: float = Field(0.0, ge=0, le=100_000)
    #: estimated, HTTP upstream: joules per prompt token and per generated token.
    joules_per_prompt_token: float = Field(0.005, ge=0)
    joules_per_output_token: float = Field(0.05, ge=0)


#: A backend's ``site``: the entry of ``sites`` its hardware runs at (PUE, WUE, carbon
#: intensity); none: the default site (PUE 1, WUE 0, no carbon source).
_SiteName = Annotated[str, Field(pattern=NAME_PATTERN)]


class BackendEntry(_Strict):
    """The base of every ``backends`` entry's model (:func:`backend_spec`): its kind's
    settings come between ``kind`` and ``energy``."""

    kind: str
    #: The descriptor of the entry's kind: its capabilities and how it is built.
    backend_kind: ClassVar[BackendKind]
    if TYPE_CHECKING:
        # Declared by backend_spec after the kind's settings (field order); typed here.
        energy: EnergySpec
        site: str | None


def backend_spec(kind: BackendKind) -> type[BackendEntry]:
    """The policy model of one kind: ``kind`` (the union's tag), the kind's own settings
    (with their validators), then ``energy``: how the gateway meters the backend, a gateway
    matter that backends never see.

    Field order is what error messages list: ``kind`` comes first because
    :class:`BackendEntry` is the last base, whose fields pydantic collects first.
    """
    tag: Any = Literal[kind.name]  # one Literal per kind, built at runtime
    spec = cast("type[BackendEntry]", create_model(
        f"{kind.settings.__name__}Entry", __base__=(kind.settings, BackendEntry),
        __module__=__name__, __doc__=kind.settings.__doc__,
        kind=(tag, ...), site=(_SiteName | None, None), energy=(EnergySpec, EnergySpec())))
    spec.backend_kind = kind
    return spec


def backend_union(kinds: Iterable[BackendKind]) -> Any:
    """The ``backends`` entry type of a policy: one model per kind, told apart by ``kind``."""
    specs = tuple(backend_spec(kind) for kind in kinds)
    return Annotated[Union[specs], Field(discriminator="kind")]  # noqa: UP007 - built at runtime


#: A policy's backend entry, of any kind the registry lists (statically: their common base).
if TYPE_CHECKING:
    BackendSpec = BackendEntry
else:
    BackendSpec = backend_union(KINDS.values())


class PrometheusCarbonSpec(_Strict):
    """Carbon intensity from a Prometheus server: an instant query, refreshed in the
    background (see :mod:`gateway.carbon`)."""

    #: The server's base URL, e.g. ``http://prometheus:9090``.
    url: str = Field(min_length=1)
    #: An instant query whose value is gCO₂/kWh (several series: their mean).
    query: str = Field(min_length=1)
    refresh_s: float = Field(60.0, gt=0, le=86400)
    #: gCO₂/kWh until the first answer; none: 0 g, labelled ``unavailable``.
    fallback: float | None = Field(None, ge=0)
    #: Optional: a query whose samples, labelled ``hours_ahead`` (0, 1, ...), forecast the
    #: coming hours (used to schedule deferrable work); without it the forecast holds the
    #: latest value.
    forecast_query: str | None = Field(None, min_length=1)


class CarbonSpec(_Strict):
    """A site's grid carbon intensity, gCO₂/kWh: exactly one of ``constant``, ``schedule``
    (hour of day 0-23 → value; an hour left out takes the previous listed hour's value) or
    ``prometheus``."""

    constant: float | None = Field(None, ge=0, le=100_000)
    schedule: dict[Annotated[int, Field(ge=0, le=23)],
                   Annotated[float, Field(ge=0, le=100_000)]] | None = Field(None, min_length=1)
    #: The schedule's clock (an IANA zone name).
    tz: str = "UTC"
    prometheus: PrometheusCarbonSpec | None = None

    @model_validator(mode="after")
    def _one_source(self) -> CarbonSpec:
        given = [k for k in ("constant", "schedule", "prometheus") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of constant, schedule or prometheus"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.tz != "UTC":
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(self.tz)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {self.tz!r}") from None
        return self


class SiteSpec(_Strict):
    """Where backends run: facility overheads and the grid's carbon (docs/energy.md)."""

    #: Power Usage Effectiveness: facility energy ÷ IT energy.
    pue: float = Field(1.0, ge=1.0, le=10.0)
    #: Water Usage Effectiveness: litres of site water per kWh of IT energy.
    wue_l_per_kwh: float = Field(0.0, ge=0, le=100.0)
    carbon: CarbonSpec | None = None


class TierSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    #: Name of an entry under ``backends``.
    backend: str
    #: The concrete model name: what clients may pin, what responses report, and what an
    #: HTTP backend is asked for upstream.
    model: str = Field(min_length=1, max_length=256)
    #: Relative energy cost (cheapest tier lowest). Tiers are ordered by it.
    cost: float = Field(gt=0)
    #: Seeds of this tier's calibration (joules per prompt / generated token) until
    #: measured requests refine them.
    joules_per_prompt_token: float = Field(0.01, ge=0)
    joules_per_output_token: float = Field(0.5, ge=0)
    #: What this tier must not be used for, although its backend kind could: e.g. an HTTP
    #: upstream whose model is a chat model serves no embeddings, or a small model whose
    #: tool calls are poor. Routing then sends such requests to other tiers.
    disable: list[Literal["tools", "structured_output", "logprobs", "prompt_logprobs",
                          "insertion", "embeddings"]] = Field(default_factory=list)


class BudgetSpec(_Strict):
    window: Literal["1m", "1h", "1d", "7d", "30d", "calendar-month"]
    #: The budget in IT joules (``unit: joules``, the default).
    joules: float | None = Field(None, gt=0)
    #: What the window counts: IT ``joules``, ``facility_kwh`` (IT energy × the site's PUE),
    #: ``litres`` of water or grams of CO₂ (``gco2``); other units give ``limit``.
    unit: Literal["joules", "facility_kwh", "litres", "gco2"] = "joules"
    #: The budget in ``unit``.
    limit: float | None = Field(None, gt=0)
    #: Past this share of the window's budget, responses carry X-Joulegate-Budget-Warning.
    soft_pct: float = Field(80.0, gt=0, le=100)

    @model_validator(mode="after")
    def _one_amount(self) -> BudgetSpec:
        if self.unit == "joules":
            if (self.joules is None) == (self.limit is None):
                raise ValueError("a joule budget needs joules (or limit), not both")
        elif self.joules is not None or self.limit is None:
            raise ValueError(f"a budget in {self.unit} gives limit (in {self.unit}), not joules")
        return self

    @property
    def amount(self) -> float:
        """The budget in its unit."""
        value = self.limit if self.limit is not None else self.joules
        assert value is not None  # the validator requires one
        return value


class LedgerSpec(_Strict):
    """Where budget spend is kept."""

    #: ``embedded``: a SQLite file (one host; safe across its worker processes).
    #: ``redis``: shared by every gateway replica (required beyond one host).
    kind: Literal["embedded", "redis"] = "embedded"
    #: embedded: the file; default ``<state_dir>/ledger.sqlite``.
    path: str | None = None
    #: redis: the server, e.g. ``redis://redis:6379/0``.
    url: str | None = None
    #: When the ledger cannot be reached (Redis down; the embedded file locked past
    #: ``busy_timeout_ms`` or failing): ``fail_closed`` answers 503; ``fail_open`` serves,
    #: keeps the spend locally and records it in the ledger once it is back.
    on_unavailable: Literal["fail_closed", "fail_open"] = "fail_closed"
    #: A reservation neither settled nor released by then (a crashed gateway) returns to
    #: the budget.
    reservation_ttl_s: float = Field(600.0, gt=0, le=86400)
    #: embedded: how long one attempt waits for SQLite's write lock when another process
    #: (a worker, ``joulegate budget``) holds it. An operation makes up to 3 attempts;
    #: then the ledger counts as unavailable and ``on_unavailable`` applies.
    busy_timeout_ms: int = Field(250, ge=1, le=10000)


class CapacitySpec(_Strict):
    """Mixture-of-Depths style capacity of a costly tier: at most ``fraction`` of a tenant's
    requests (``by: requests``) or of its joules (``by: joules``) in the last ``window_s``
    seconds may use it; the hardest requests take it."""

    fraction: float = Field(gt=0, le=1)
    by: Literal["requests", "joules"] = "requests"
    window_s: float = Field(300.0, gt=0, le=86400)


class CascadeSpec(_Strict):
    """``estimator: cascade``: an ``auto`` request is answered by its routed (cheapest) tier,
    which is probed before anything reaches the client; when the probe's confidence (by
    ``statistic``) is below ``threshold``, that answer is dropped and the request escalates
    to ``to`` (see :mod:`gateway.cascade`)."""

    threshold: float = Field(0.8, ge=0, le=1)
    #: What is probed: ``answer``, the cheap tier's first ``probe_tokens`` answer tokens;
    #: ``prompt``, how likely the cheap tier finds the request's own text (the last user
    #: turn, or the prompt; at most its last ``prompt_tokens`` tokens), read as it reads the
    #: prompt: an escalation costs a prompt read and one token.
    signal: Literal["answer", "prompt"] = "answer"
    probe_tokens: int = Field(8, ge=1, le=256)
    #: llama.cpp keeps a row of logits per scored position in its output buffer, which
    #: grows to the most rows one step held: up to 512 x 151,936 floats (~310 MB) for
    #: Qwen2.5 at the default, once a prompt that long was scored.
    prompt_tokens: int = Field(512, ge=1, le=8192)
    #: How the probe's tokens make one confidence: ``mean``, exp(mean log-probability);
    #: ``min``, the probability of the least likely token.
    statistic: Literal["mean", "min"] = "mean"
    #: The tier to escalate to; default: the next costlier tier the request may use.
    to: str | None = Field(None, pattern=NAME_PATTERN)
    #: A difficulty estimator (``heuristic``, ``learned``, ``semantic``) whose score of the
    #: request, d in [0, 1], lowers the probe's confidence before it meets ``threshold``:
    #: confidence x exp(-prior_weight x d). The probe tells how sure the cheap tier is; the
    #: prior, what kind of task it was asked (none: the probe alone).
    prior: str | None = Field(None, pattern=NAME_PATTERN)
    #: Nats of log-probability one unit of the prior's difficulty is worth. The default is
    #: what leave-one-dataset-out chooses on every labelled source, worst source first
    #: (`joulegate router eval`): 0, as the heuristic lowers MBPP's ranking, the worst (and
    #: mmlu_local's); it lifts HumanEval's and MMLU's, so traffic like theirs may set 2 to 3.
    prior_weight: float = Field(0.0, ge=0, le=50)

    @field_validator("prior")
    @classmethod
    def _prior_scores_up_front(cls, value: str | None) -> str | None:
        if value == "cascade":
            raise ValueError("the cascade's prior must be an estimator that scores the request "
                             "up front (heuristic, learned, semantic), not 'cascade' itself")
        return value


class RoutingSpec(_Strict):
    """How ``model: "auto"`` picks a tier. Every key is optional; a tenant's ``routing``
    overrides the policy's key by key."""

    #: Difficulty estimator: ``heuristic``, ``learned`` or ``semantic`` (see `joulegate route`), or
    #: ``cascade``: start on the cheapest tier and escalate on low confidence (``cascade``).
    estimator: str | None = Field(None, pattern=NAME_PATTERN)
    #: Tier name → the lowest difficulty score that may use it. The cheapest tier needs
    #: none; a costlier tier without a threshold is never chosen by the gate (only pinned).
    thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] | None = None
    #: Tier name → capacity (tiers above the cheapest).
    capacity: dict[str, CapacitySpec] | None = None
    #: Budget pressure: points ``[remaining budget fraction, threshold raise]``; between
    #: them the raise is interpolated linearly. ``[]`` turns pressure off.
    pressure: list[Annotated[list[Annotated[float, Field(ge=0, le=1)]],
                             Field(min_length=2, max_length=2)]] | None = None
    #: Among tiers that may serve a request, how much their grams of CO₂ for the predicted
    #: joules weigh against the joules themselves: 0 energy only, 1 carbon only.
    carbon_weight: float | None = Field(None, ge=0, le=1)

    #: When a tier's backend cannot take a request (down, overloaded, no first token in
    #: time) before anything reached the client: ``auto`` retries ``model: "auto"``
    #: requests on the next tier of the ladder, ``all`` pinned ones too, ``off`` never.
    fallback: Literal["off", "auto", "all"] | None = None
    #: The ladder, most preferred first; default: the tenant's tiers from costliest down.
    fallback_ladder: list[str] | None = None
    #: ``estimator: cascade``'s probe and threshold (default: :class:`CascadeSpec`'s).
    cascade: CascadeSpec | None = None

    def merged(self, override: RoutingSpec | None) -> RoutingSpec:
        if override is None:
            return self
        return self.model_copy(update={k: v for k, v in override if v is not None})


#: The policy-wide routing defaults when a policy gives none.
DEFAULT_ROUTING = RoutingSpec(estimator="learned", thresholds={}, capacity={},
                              pressure=[[0.5, 0.0], [0.1, 0.3], [0.0, 1.0]], fallback="auto",
                              carbon_weight=0.0)


class TenantSpec(_Strict):
    keys: list[KeyRefStr] = Field(min_length=1)
    #: Tiers this tenant may use; omitted: all tiers.
    tiers: list[str] | None = None
    #: The tier ``model: "auto"`` starts from: easy requests run on it, and the gate moves a
    #: request up only to costlier tiers that have a threshold (``routing.thresholds``).
    default_tier: str
    #: Per-tenant routing overrides (estimator, thresholds, capacity, pressure).
    routing: RoutingSpec | None = None
    #: Joule budgets, all enforced at once.
    budgets: list[BudgetSpec] = Field(default_factory=list)
    #: When a request's predicted joules do not fit: ``degrade`` to the most capable
    #: cheaper tier (of ``degrade_ladder``) whose prediction fits, else 429; ``reject``: 429.
    on_exhausted: Literal["degrade", "reject"] = "degrade"
    #: Tiers to degrade through; default: the tenant's tiers.
    degrade_ladder: list[str] | None = None
    #: Cap on max_tokens when degrading.
    degrade_max_tokens: int | None = Field(None, ge=1)
    #: max_tokens assumed (and enforced) for budgeted requests that give none, so that a
    #: reservation bounds what the request may spend.
    default_max_tokens: int = Field(1024, ge=1, le=1 << 20)
    #: OpenAI request fields the gateway does not use (``store``, ``service_tier``, or
    #: ``logit_bias`` on an in-process tier; see the README's field table): ``drop``
    #: them (named in ``X-Joulegate-Dropped-Params``) or ``reject`` the request with a 400.
    #: LiteLLM's ``drop_params``.
    unsupported_params: Literal["drop", "reject"] = "drop"


class BatchesSpec(_Strict):
    """The Batch API (``/v1/files``, ``/v1/batches``): deferrable work, run when the grid
    is cleanest inside each batch's window (see :mod:`gateway.batches`)."""

    #: Largest upload; larger: 413.
    max_file_bytes: int = Field(100 << 20, ge=1024, le=1 << 31)
    #: Most requests in one batch input file; more: 400.
    max_lines: int = Field(50_000, ge=1, le=1_000_000)
    #: Longest ``completion_window`` accepted (OpenAI's is 24h).
    max_window_s: float = Field(7 * 86400, ge=60, le=366 * 86400)
    #: Requests of one batch in flight at once, per gateway process.
    concurrency: int = Field(2, ge=1, le=256)
    #: Seconds one request is expected to take: with ``concurrency``, how long a batch is
    #: expected to run, which the cleanest start is chosen for.
    line_seconds: float = Field(5.0, gt=0, le=3600)
    #: Seconds between looks at the batch store for work other processes created or
    #: cancelled (work created or cancelled here is seen at once).
    poll_interval_s: float = Field(5.0, gt=0, le=3600)
    #: How long a process may hold a batch without renewing its claim; past it another
    #: process takes the batch over (the holder died).
    lease_s: float = Field(60.0, ge=5, le=86400)


class Policy(_Strict):
    version: Literal[1]
    #: Where calibration and other state persist; default ``~/.local/state/joulegate``.
    state_dir: str | None = None
    server: ServerSpec = ServerSpec()
    admin: AdminSpec = AdminSpec()
    ledger: LedgerSpec = LedgerSpec()
    backends: dict[Annotated[str, Field(pattern=NAME_PATTERN)], BackendSpec] = Field(min_length=1)
    tiers: list[TierSpec] = Field(min_length=1)
    tenants: dict[Annotated[str, Field(pattern=NAME_PATTERN)], TenantSpec] = Field(min_length=1)
    #: Difficulty routing defaults for every tenant (see RoutingSpec).
    routing: RoutingSpec | None = None
    #: Sites backends run at (``backends.<name>.site``): PUE, WUE, carbon intensity.
    sites: dict[Annotated[str, Field(pattern=NAME_PATTERN)], SiteSpec] = Field(default_factory=dict)
    #: The Batch API's limits and pacing (see BatchesSpec).
    batches: BatchesSpec = BatchesSpec()

    def tenant_routing(self, tenant: str) -> RoutingSpec:
        """The routing settings in force for a tenant: built-in defaults, then the policy's,
        then the tenant's, key by key."""
        return DEFAULT_ROUTING.merged(self.routing).merged(self.tenants[tenant].routing)

    def ordered_tiers(self) -> list[TierSpec]:
        """Tiers from cheapest to most expensive."""
        return sorted(self.tiers, key=lambda t: t.cost)

    def tenant_tiers(self, tenant: str) -> list[TierSpec]:
        """The tiers a tenant may use, cheapest first."""
        allowed = self.tenants[tenant].tiers
        return [t for t in self.ordered_tiers() if allowed is None or t.name in allowed]

    def reference_issues(self) -> list[tuple[str, str]]:
        """Mistakes that span entries, as ``(key path, message)`` pairs; empty when consistent."""
        return reference_issues(self.model_dump())


def did_you_mean(word: object, choices: Iterable[object]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a misspelt ``word``, else ``""``."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _not_a_tier(tier: str, tiers: list[str]) -> str:
    return (f"'{tier}' is not a tier here; expected one of: {', '.join(tiers)}"
            f"{did_you_mean(tier, tiers)}")


def _routing_issues(where: str, spec: Any, tiers: list[str]) -> list[tuple[str, str]]:
    spec = _mapping(spec)
    issues = []
    for j, tier in enumerate(_items(spec.get("fallback_ladder"))):
        if isinstance(tier, str) and tier not in tiers:
            issues.append((f"{where}.fallback_ladder[{j}]", _not_a_tier(tier, tiers)))
    for key in ("thresholds", "capacity"):
        for tier in _mapping(spec.get(key)):
            if isinstance(tier, str) and tier not in tiers:
                issues.append((f"{where}.{key}.{tier}", _not_a_tier(tier, tiers)))
    escalate_to = _mapping(spec.get("cascade")).get("to")
    if isinstance(escalate_to, str) and escalate_to not in tiers:
        issues.append((f"{where}.cascade.to", _not_a_tier(escalate_to, tiers)))
    given = [_number(p[0]) for p in _items(spec.get("pressure")) if _items(p)]
    points = [p for p in given if p is not None]
    if points != sorted(points, reverse=True) or len(set(points)) != len(points):
        issues.append((f"{where}.pressure", "points must go from more remaining budget to "
                       "less, e.g. [[0.5, 0.0], [0.1, 0.3], [0.0, 1.0]]"))
    return issues


def reference_issues(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Mistakes that span entries (a tier naming an unknown backend, a tenant an unknown
    tier, ...), as ``(key path, message)`` pairs.

    Works on the parsed YAML as written, so that it runs even when the schema found other
    mistakes: pieces that are missing or of the wrong type are skipped here (the schema
    reports them), never guessed at.
    """
    issues: list[tuple[str, str]] = []
    backends = _mapping(data.get("backends"))
    tiers = [(i, t) for i, t in enumerate(_items(data.get("tiers"))) if isinstance(t, dict)]
    tier_names: list[str] = []
    model_names: dict[str, str] = {}
    for i, tier in tiers:
        where = f"tiers[{i}]"
        name, backend, model = (_text(tier.get(k)) for k in ("name", "backend", "model"))
        if AUTO_MODEL in (name, model):
            issues.append((where, f"'{AUTO_MODEL}' is reserved for gateway routing"))
        if name is not None and name in tier_names:
            issues.append((f"{where}.name", f"duplicate tier name '{name}'"))
        elif name is not None:
            tier_names.append(name)
        if backend is not None and backends and backend not in backends:
            known = sorted(map(str, backends))
            issues.append((f"{where}.backend", f"unknown backend '{backend}'; expected one of: "
                           f"{', '.join(known)}{did_you_mean(backend, known)}"))
        if model is not None and name is not None:
            if model in model_names and model_names[model] != name:
                issues.append((f"{where}.model", f"model '{model}' is already served by tier "
                               f"'{model_names[model]}'; a pinned model must name one tier"))
            model_names.setdefault(model, name)
    for i, tier in tiers:
        name, model = _text(tier.get("name")), _text(tier.get("model"))
        if model is not None and model != name and model in tier_names:
            issues.append((f"tiers[{i}].model", f"'{model}' is another tier's name; "
                           "a model name must not shadow a tier"))
    costs = [(_number(t.get("cost")), _text(t.get("name"))) for _, t in tiers]
    by_cost = list(dict.fromkeys(name for _, name in sorted(
        costs, key=lambda pair: float("inf") if pair[0] is None else pair[0]) if name))
    tenants = {name: t for name, t in _mapping(data.get("tenants")).items() if isinstance(t, dict)}
    seen_keys: dict[str, str] = {}
    allowed_by_tenant: dict[str, list[str]] = {}
    for name, tenant in tenants.items():
        where = f"tenants.{name}"
        given = tenant.get("tiers")
        own = [t for t in _items(given) if isinstance(t, str)]
        allowed = own if isinstance(given, list) else sorted(tier_names)
        allowed_by_tenant[name] = allowed
        if tier_names:
            for j, t in enumerate(_items(given)):
                if isinstance(t, str) and t not in tier_names:
                    issues.append((f"{where}.tiers[{j}]", f"unknown tier '{t}'; expected one of: "
                                   f"{', '.join(by_cost)}{did_you_mean(t, by_cost)}"))
            default = _text(tenant.get("default_tier"))
            if default is not None and default not in allowed:
                issues.append((f"{where}.default_tier", f"'{default}' is not one of this tenant's "
                               f"tiers ({', '.join(allowed)}){did_you_mean(default, allowed)}"))
            for j, t in enumerate(_items(tenant.get("degrade_ladder"))):
                if isinstance(t, str) and t not in allowed:
                    issues.append((f"{where}.degrade_ladder[{j}]", f"'{t}' is not one of this "
                                   f"tenant's tiers ({', '.join(allowed)})"
                                   f"{did_you_mean(t, allowed)}"))
        windows = [b.get("window") for b in _items(tenant.get("budgets"))
                   if isinstance(b, dict) and isinstance(b.get("window"), str)]
        if len(set(windows)) != len(windows):
            issues.append((f"{where}.budgets", "each window may have one budget"))
        for j, k in enumerate(_items(tenant.get("keys"))):
            if not isinstance(k, str):
                continue
            if k in seen_keys:
                issues.append((f"{where}.keys[{j}]", f"the same key is also given to tenant "
                               f"'{seen_keys[k]}'; a key must identify one tenant"))
            seen_keys.setdefault(k, name)
    if tier_names:
        issues += _routing_issues("routing", data.get("routing"), sorted(tier_names))
        for name, tenant in tenants.items():
            issues += _routing_issues(f"tenants.{name}.routing", tenant.get("routing"),
                                      [t for t in allowed_by_tenant[name] if t in tier_names])
    sites = _mapping(data.get("sites"))
    for name, backend in backends.items():
        site = _text(_mapping(backend).get("site"))
        if site is not None and site != "default" and site not in sites:
            known = sorted(map(str, sites))
            issues.append((f"backends.{name}.site", f"unknown site '{site}'; expected one of: "
                           f"{', '.join(known) or '(no sites: add them under sites)'}"
                           f"{did_you_mean(site, known)}"))
    ledger = _mapping(data.get("ledger"))
    if ledger.get("kind") == "redis" and not ledger.get("url"):
        issues.append(("ledger.url", "a redis ledger needs url (e.g. redis://host:6379/0)"))
    return issues
