"""What each tier can do, read from its backend kind's :class:`~backends.kind.Capabilities`,
and the tiers a request that needs one capability may run on.

A chat or text completion needs ``generation``; an embeddings request needs ``embeddings``.
Routing (difficulty, budget degrade, fallback) then chooses only among those tiers. A
request pinned to a tier that cannot do it, or a tenant with no such tier, is a 400
(``capability_missing``) that names the capability and the models that have it.
"""

from __future__ import annotations

from typing import Any

from backends.kind import Capabilities
from policies import AUTO_MODEL, Policy, TierSpec
from policies.schema import BackendEntry

from .errors import InvalidRequest
from .routing.tiers import resolve_model, tenant_models

#: How a capability is named to a client.
_SAYS = {"generation": "chat and text completions", "embeddings": "embeddings"}


class CapabilityMissing(InvalidRequest):
    code = "capability_missing"


def tier_capabilities(policy: Policy, tier: TierSpec) -> Capabilities:
    spec: BackendEntry = policy.backends[tier.backend]
    return spec.backend_kind.capabilities


def model_capabilities(caps: list[Capabilities]) -> dict[str, bool]:
    """What a model object of ``GET /v1/models`` says it supports: a tier's, or for ``auto``
    what any of the tenant's tiers supports."""
    def some(name: str) -> bool:
        return any(getattr(c, name) for c in caps)

    generation = some("generation")
    return {"chat": generation, "completions": generation, "embeddings": some("embeddings"),
            "streaming": generation and some("streaming"), "tools": some("tools"),
            "structured_output": some("structured_output")}


def capable_tiers(policy: Policy, tenant: str, capability: str, model: str | None
                  ) -> tuple[TierSpec, ...]:
    """The tenant's tiers that have ``capability``, cheapest first. Raises
    :class:`CapabilityMissing` when ``model`` pins a tier without it or none has it, and
    :class:`~gateway.routing.ModelNotFound` for a model the tenant may not use."""
    tiers = policy.tenant_tiers(tenant)
    able = tuple(t for t in tiers if getattr(tier_capabilities(policy, t), capability))
    pinned = None
    if model is not None and model != AUTO_MODEL:
        pinned = resolve_model(tiers, model)  # ModelNotFound when it is not the tenant's
    if pinned is not None and pinned in able:
        return able
    if pinned is None and able:
        return able
    which = f"the model '{model}' cannot serve" if pinned is not None else "no model of yours serves"
    others = ", ".join(t.name for t in able)
    raise CapabilityMissing(
        f"{which} {_SAYS.get(capability, capability)}: capability '{capability}' missing"
        + (f"; models that can: {others}" if others else ""), param="model")


def model_objects(policy: Policy, tenant: str) -> list[dict[str, Any]]:
    """The model objects of ``GET /v1/models`` for a tenant: ``auto``, each tier and each
    concrete model, with the tier and backend behind it and what it supports."""
    tiers = policy.tenant_tiers(tenant)
    caps = {t.name: tier_capabilities(policy, t) for t in tiers}
    return [{"id": model_id, "object": "model", "created": 0, "owned_by": "joulegate",
             "tier": tier.name if tier else None, "backend": tier.backend if tier else None,
             "capabilities": model_capabilities([caps[tier.name]] if tier else list(caps.values()))}
            for model_id, tier in tenant_models(tiers)]
