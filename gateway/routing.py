"""Pick the tier a request runs on.

``model: "auto"`` resolves to the tenant's default tier (difficulty routing will choose
here); a tier name or a concrete model name pins its tier, if the tenant may use it.
"""

from __future__ import annotations

from policies import AUTO_MODEL, TierSpec

from .errors import InvalidRequest
from .runtime import Snapshot


def pick_tier(snap: Snapshot, tenant: str, model: str) -> TierSpec:
    spec = snap.policy.tenants[tenant]
    if model == AUTO_MODEL:
        return snap.tiers[spec.default_tier]
    tier = snap.tiers.get(model) or snap.models.get(model)
    if tier is None or (spec.tiers is not None and tier.name not in spec.tiers):
        # One answer for both, so a tenant cannot probe which models others may use.
        raise InvalidRequest(f"the model '{model}' does not exist or you may not use it; "
                             "GET /v1/models lists yours", param="model", code="model_not_found")
    return tier


def tenant_models(snap: Snapshot, tenant: str) -> list[tuple[str, TierSpec | None]]:
    """``(id, tier)`` for every model id the tenant may name: ``auto``, tiers, concrete models."""
    out: list[tuple[str, TierSpec | None]] = [(AUTO_MODEL, None)]
    for tier in snap.policy.tenant_tiers(tenant):
        out.append((tier.name, tier))
        if tier.model != tier.name:
            out.append((tier.model, tier))
    return out
