from __future__ import annotations

import pytest

from gateway.auth import KeyIndex, authenticate
from gateway.errors import AuthenticationError
from policies import key_digest, resolve_key_ref

pytestmark = pytest.mark.unit


def test_lookup_and_errors_never_echo_the_key():
    index = KeyIndex([(key_digest("sk-a"), "a"), (key_digest("sk-b"), "b")])
    assert authenticate(index, "Bearer sk-a") == "a"
    assert authenticate(index, "bearer   sk-b ") == "b"
    for header, fragment in [(None, "missing API key"), ("Basic xyz", "malformed"),
                             ("Bearer ", "malformed"), ("Bearer sk-zzz", "invalid API key")]:
        with pytest.raises(AuthenticationError) as info:
            authenticate(index, header)
        assert fragment in info.value.message and "sk-zzz" not in info.value.message
        assert info.value.status == 401 and info.value.headers["www-authenticate"] == "Bearer"


def test_env_key_references():
    assert resolve_key_ref("env:K", {"K": "sk-x"}) == key_digest("sk-x")
    assert resolve_key_ref("sha256:" + "ab" * 32) == "ab" * 32
    with pytest.raises(KeyError):
        resolve_key_ref("env:K", {})
