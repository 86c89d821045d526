"""API keys → tenants.

Policies hold only sha256 digests of keys (or ``env:VAR`` references, hashed at load).
A presented key is hashed and compared with every known digest using
:func:`hmac.compare_digest`, with no early exit, so the time taken does not depend on
which digest (if any) matches. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from .errors import AuthenticationError

_BEARER = "bearer "


class KeyIndex:
    """Digest → owner lookup for one policy version."""

    def __init__(self, entries: Iterable[tuple[str, str]]):
        # (digest bytes, owner) pairs; digests are compared as raw 32-byte strings.
        self._entries = [(bytes.fromhex(digest), owner) for digest, owner in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> str | None:
        presented = hashlib.sha256(key.encode("utf-8")).digest()
        found: str | None = None
        for digest, owner in self._entries:
            if hmac.compare_digest(presented, digest) and found is None:
                found = owner
        return found


def bearer_key(authorization: str | None) -> str:
    """The key from an ``Authorization: Bearer <key>`` header, or 401."""
    if not authorization:
        raise AuthenticationError("missing API key: send the header 'Authorization: Bearer <key>'")
    if authorization[:7].lower() != _BEARER or not authorization[7:].strip():
        raise AuthenticationError("malformed Authorization header: expected 'Bearer <key>'")
    return authorization[7:].strip()


def authenticate(index: KeyIndex, authorization: str | None) -> str:
    """The owner of the presented key, or 401. The message never echoes the key."""
    owner = index.lookup(bearer_key(authorization))
    if owner is None:
        raise AuthenticationError("invalid API key")
    return owner
