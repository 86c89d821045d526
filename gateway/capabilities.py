"""What each tier can do, read from its backend kind's :class:`~backends.kind.Capabilities`,
and the tiers a request that needs one capability may run on.

A chat or text completion needs ``generation``, and also ``tools``, ``structured_output``,
``logprobs`` or ``insertion`` (a ``suffix``) when it uses them (:func:`gateway.fields.needed_capabilities`); an embeddings
request needs ``embeddings``.
Routing (difficulty, budget degrade, fallback) then chooses only among those tiers. A
request pinned to a tier that cannot do it, or a tenant with no such tier, is a 400
(``capability_missing``) that names the capability and the models that have it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from backends.kind import Capabilities
from policies import AUTO_MODEL, Policy, TierSpec
from policies.schema import BackendEntry

from .errors import InvalidRequest
from .routing.tiers import resolve_model, tenant_models

#: How a capability is named to a client.
_SAYS = {"generation": "chat and text completions", "embeddings": "embeddings",
         "tools": "tool calls (tools)", "structured_output": "structured output (response_format)",
         "logprobs": "log-probabilities (logprobs)",
         "insertion": "fill in the middle (suffix)"}


class CapabilityMissing(InvalidRequest):
    code = "capability_missing"


def tier_capabilities(policy: Policy, tier: TierSpec) -> Capabilities:
    """What ``tier`` can do: its backend kind's capabilities less the tier's ``disable``."""
    spec: BackendEntry = policy.backends[tier.backend]
    caps = spec.backend_kind.capabilities
    return dataclasses.replace(caps, **dict.fromkeys(tier.disable, False)) if tier.disable else caps


def model_capabilities(caps: list[Capabilities]) -> dict[str, bool]:
    """What a model object of ``GET /v1/models`` says it supports: a tier's, or for ``auto``
    what any of the tenant's tiers supports."""
    def some(name: str) -> bool:
        return any(getattr(c, name) for c in caps)

    generation = some("generation")
    return {"chat": generation, "completions": generation, "embeddings": some("embeddings"),
            "streaming": generation and some("streaming"), "tools": some("tools"),
            "structured_output": some("structured_output"), "insertion": some("insertion")}


def capable_tiers(policy: Policy, tenant: str, capability: str | Sequence[str],
                  model: str | None) -> tuple[TierSpec, ...]:
    """The tenant's tiers that have ``capability`` (one name, or several that must all be
    there), cheapest first. Raises :class:`CapabilityMissing` naming what is missing when
    ``model`` pins a tier without it or no tier has it, and
    :class:`~gateway.routing.ModelNotFound` for a model the tenant may not use."""
    wanted = (capability,) if isinstance(capability, str) else tuple(capability)
    tiers = policy.tenant_tiers(tenant)
    caps = {t.name: tier_capabilities(policy, t) for t in tiers}
    able = tuple(t for t in tiers if all(getattr(caps[t.name], c) for c in wanted))
    pinned = None
    if model is not None and model != AUTO_MODEL:
        pinned = resolve_model(tiers, model)  # ModelNotFound when it is not the tenant's
    if pinned is not None and pinned in able:
        return able
    if pinned is None and able:
        return able
    if pinned is not None:
        missing = [c for c in wanted if not getattr(caps[pinned.name], c)]
        which = f"the model '{model}' cannot serve"
    else:
        missing = [c for c in wanted if not any(getattr(k, c) for k in caps.values())] or list(wanted)
        which = "no model of yours serves"
    others = ", ".join(t.name for t in able)
    what = " with ".join(_SAYS.get(c, c) for c in missing)
    names = ", ".join(f"'{c}'" for c in missing)
    raise CapabilityMissing(
        f"{which} {what}: capabilit{'ies' if len(missing) > 1 else 'y'} {names} missing"
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
