"""Policy schema and loading. Never imports ``gateway``; reads the backend kinds (their
settings models) from :mod:`backends.registry`."""

from .loader import (
    DEFAULT_POLICY_PATH,
    Check,
    PolicyError,
    PolicyIssue,
    PolicyReport,
    inspect_policy,
    load_policy,
    parse_policy,
)
from .schema import (
    AUTO_MODEL,
    DEFAULT_ROUTING,
    BackendSpec,
    CapacitySpec,
    CascadeSpec,
    EnergySpec,
    Policy,
    RoutingSpec,
    TenantSpec,
    TierSpec,
    did_you_mean,
    key_digest,
    reference_issues,
    resolve_key_ref,
)

__all__ = [
    "AUTO_MODEL", "DEFAULT_POLICY_PATH", "DEFAULT_ROUTING", "BackendSpec", "CapacitySpec",
    "CascadeSpec", "Check", "EnergySpec", "Policy", "PolicyError", "PolicyIssue",
    "PolicyReport", "RoutingSpec", "TenantSpec", "TierSpec", "did_you_mean", "inspect_policy",
    "key_digest", "load_policy", "parse_policy", "reference_issues", "resolve_key_ref",
]
