"""Policy schema and loading. Imports neither ``gateway`` nor ``backends``."""

from .loader import DEFAULT_POLICY_PATH, PolicyError, PolicyIssue, load_policy, parse_policy
from .schema import (
    AUTO_MODEL,
    DEFAULT_ROUTING,
    CapacitySpec,
    LlamaCppBackendSpec,
    OpenAIBackendSpec,
    Policy,
    RoutingSpec,
    TenantSpec,
    TierSpec,
    key_digest,
    resolve_key_ref,
)

__all__ = [
    "AUTO_MODEL", "DEFAULT_POLICY_PATH", "DEFAULT_ROUTING", "CapacitySpec", "LlamaCppBackendSpec",
    "OpenAIBackendSpec", "Policy", "PolicyError", "PolicyIssue", "RoutingSpec", "TenantSpec",
    "TierSpec", "key_digest", "load_policy", "parse_policy", "resolve_key_ref",
]
