"""Access tokens: signed with the standard library, they are what pyjwt writes and what the engine accepts."""

from __future__ import annotations

import jwt
import pytest

from tests.conftest import SECRET
from webmacs.exceptions import ConfigError
from webmacs.security import create_access_token, inspect_access_token


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_access_tokens_are_byte_for_byte_pyjwts(algorithm: str) -> None:
    key = SECRET * 2  # long enough for HS512: pyjwt warns about shorter keys
    token = create_access_token(user_id=42, role="operator", key=key, algorithm=algorithm, minutes=90)
    claims = jwt.decode(token, key, algorithms=[algorithm])
    assert list(claims) == ["sub", "exp", "iat", "role", "jti"]
    assert claims["sub"] == "42" and claims["role"] == "operator" and claims["exp"] - claims["iat"] == 90 * 60
    # The same claims through pyjwt give the same string: header, claim order, separators and signature.
    assert jwt.encode(claims, key, algorithm=algorithm) == token
    found = inspect_access_token(token, key=key, algorithm=algorithm)
    assert found is not None and found.user_id == 42 and found.current


def test_access_tokens_need_an_hmac_algorithm() -> None:
    with pytest.raises(ConfigError, match="RS256"):
        create_access_token(user_id=1, role="admin", key=SECRET, algorithm="RS256", minutes=1)
