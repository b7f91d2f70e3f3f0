"""HS256 token verification, sans I/O: what grants access and every way a token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickstream_gateway.tokens import MAX_TOKEN_CHARS, TokenError, sign_token, verify_token

SECRET = b"k" * 32
NOW = 1_700_000_000.0


def b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: Any, secret: bytes = SECRET) -> str:
    """A token with any header, signed with HMAC-SHA256 whatever its `alg` says."""
    signing_input = f"{b64(header)}.{b64(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def reason(token: str, now: float = NOW) -> str:
    with pytest.raises(TokenError) as info:
        verify_token(token, SECRET, now)
    return info.value.reason


def test_a_signed_unexpired_token_gives_its_claims() -> None:
    """A token signed with the secret, before its exp and after its nbf, yields its claims."""
    claims = {"sub": "alice", "exp": NOW + 60, "nbf": NOW - 60}
    assert verify_token(sign_token(claims, SECRET), SECRET, NOW) == claims
    assert verify_token(forge({"alg": "HS256"}, {"exp": int(NOW) + 1}), SECRET, NOW) == {
        "exp": int(NOW) + 1
    }


def test_expiry_is_exact_and_required() -> None:
    """A token is expired from its exp on; one without a numeric, finite exp is refused."""
    token = sign_token({"exp": NOW + 10}, SECRET)
    assert verify_token(token, SECRET, NOW + 9.999) == {"exp": NOW + 10}
    assert reason(token, now=NOW + 10) == "expired"
    assert reason(sign_token({"sub": "alice"}, SECRET)) == "missing_exp"
    assert reason(sign_token({"exp": "9999999999"}, SECRET)) == "missing_exp"
    assert reason(sign_token({"exp": True}, SECRET)) == "missing_exp"
    assert reason(forge({"alg": "HS256"}, {"exp": float("nan")})) == "missing_exp"


def test_not_before_is_honoured() -> None:
    """A token whose nbf is later than now, or not a number, is not valid yet."""
    assert reason(sign_token({"exp": NOW + 60, "nbf": NOW + 1}, SECRET)) == "not_yet_valid"
    assert reason(sign_token({"exp": NOW + 60, "nbf": "soon"}, SECRET)) == "not_yet_valid"


def test_another_key_or_a_changed_claim_breaks_the_signature() -> None:
    """A token signed with another key, or whose claims were edited, is `bad_signature`."""
    assert reason(sign_token({"exp": NOW + 60}, b"x" * 32)) == "bad_signature"
    header, _, signature = sign_token({"exp": NOW + 60, "sub": "bob"}, SECRET).split(".")
    edited = b64({"exp": NOW + 60, "sub": "root"})
    assert reason(f"{header}.{edited}.{signature}") == "bad_signature"
    assert reason(f"{header}.{edited}.") == "bad_signature"


@pytest.mark.parametrize(
    "header",
    [{"alg": "none"}, {"alg": "HS512"}, {"alg": "RS256"}, {"alg": "hs256"}, {"typ": "JWT"}],
)
def test_only_hs256_is_accepted(header: dict[str, Any]) -> None:
    """`alg` must be exactly HS256: `none`, other algorithms or no alg are refused."""
    assert reason(forge(header, {"exp": NOW + 60})) == "bad_algorithm"


def test_alg_none_without_signature_is_refused() -> None:
    """The classic forgery, alg none and an empty signature, is refused."""
    assert reason(f"{b64({'alg': 'none'})}.{b64({'exp': NOW + 60})}.") == "bad_algorithm"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        f"{b64({'alg': 'HS256'})}.{b64({'exp': 1})}.sig+nature",  # not base64url
        f"{b64(b'not json')}.{b64({'exp': 1})}.c2ln",
        f"{b64([1, 2])}.{b64({'exp': 1})}.c2ln",
        f"{b64(b'[' * 5000)}.{b64({'exp': 1})}.c2ln",  # parsing it must not recurse away
        "a" * (MAX_TOKEN_CHARS + 1),
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    """Anything that is not three base64url parts with a JSON object header is `malformed`."""
    assert reason(token) == "malformed"


def test_claims_that_are_not_an_object_are_malformed() -> None:
    """Signed claims that are not a JSON object are refused after the signature check."""
    assert reason(forge({"alg": "HS256"}, [1])) == "malformed"


@pytest.mark.parametrize(
    "exp",
    [10**400, -(10**400), 1e308, -1, "2000000000", None, [NOW + 60], {"t": 1}, 2**63],
)
def test_an_exp_that_is_not_a_time_is_refused(exp: Any) -> None:
    """Huge, negative, string or structured `exp` values are refused, never compared."""
    assert reason(sign_token({"exp": exp}, SECRET)) == "missing_exp"


def test_json_infinities_and_nan_are_not_times() -> None:
    """`Infinity`, `-Infinity` and `NaN` (which Python's json reads) are not times."""
    for literal in ("Infinity", "-Infinity", "NaN", "1e400"):
        claims = f'{{"exp":{literal}}}'.encode()
        assert reason(forge({"alg": "HS256"}, claims)) == "missing_exp", literal
        ok = f'{{"exp":{NOW + 60},"nbf":{literal}}}'.encode()
        assert reason(forge({"alg": "HS256"}, ok)) == "not_yet_valid", literal
        ok = f'{{"exp":{NOW + 60},"iat":{literal}}}'.encode()
        assert reason(forge({"alg": "HS256"}, ok)) == "bad_iat", literal


def test_lifetime_is_bounded_from_now_and_from_iat() -> None:
    """`exp` more than the maximum lifetime after now, or after `iat`, is `too_long_lived`."""
    day = 86_400.0

    def check(claims: dict[str, Any]) -> dict[str, Any]:
        return verify_token(sign_token(claims, SECRET), SECRET, NOW, max_lifetime_s=day)

    assert check({"exp": NOW + day}) == {"exp": NOW + day}
    assert check({"exp": NOW + 60, "iat": NOW - day + 60}) == {
        "exp": NOW + 60,
        "iat": NOW - day + 60,
    }
    with pytest.raises(TokenError) as info:
        check({"exp": NOW + day + 1})
    assert (info.value.reason, info.value.message) == (
        "too_long_lived",
        "token lives longer than 86400 s",
    )
    with pytest.raises(TokenError) as info:
        check({"exp": NOW + 60, "iat": NOW - day})
    assert info.value.reason == "too_long_lived"
    with pytest.raises(TokenError) as info:
        check({"exp": NOW + 60, "iat": NOW + 61})  # issued after it expires
    assert info.value.reason == "bad_iat"


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**500), max_value=10**500)
    | st.floats()
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)


@given(st.dictionaries(st.sampled_from(["exp", "nbf", "iat", "sub"]), JSON), st.floats(0, 4e9))
def test_any_signed_claims_give_claims_or_a_token_error(claims: dict[str, Any], now: float) -> None:
    """Whatever a correctly signed token claims, verification returns or raises TokenError."""
    signed = forge({"alg": "HS256"}, json.dumps(claims).encode())
    try:
        granted = verify_token(signed, SECRET, now, max_lifetime_s=86_400)
    except TokenError:
        return
    assert 0 <= float(granted["exp"]) - now <= 86_400
