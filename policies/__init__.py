"""Policy schema and loading. Imports neither ``gateway`` nor ``backends``."""

from .loader import DEFAULT_POLICY_PATH, PolicyError, PolicyIssue, load_policy, parse_policy
from .schema import (
    AUTO_MODEL,
    LlamaCppBackendSpec,
    OpenAIBackendSpec,
    Policy,
    TenantSpec,
    TierSpec,
    key_digest,
    resolve_key_ref,
)

__all__ = [
    "AUTO_MODEL", "DEFAULT_POLICY_PATH", "LlamaCppBackendSpec", "OpenAIBackendSpec", "Policy",
    "PolicyError", "PolicyIssue", "TenantSpec", "TierSpec", "key_digest", "load_policy",
    "parse_policy", "resolve_key_ref",
]
