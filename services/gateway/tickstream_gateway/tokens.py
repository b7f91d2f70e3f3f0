"""HS256 JSON Web Tokens, sans I/O: verify a client's token; sign one for operators and tests."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from typing import Any, Final

# A token is three base64url parts; anything longer than this is refused before any decoding,
# so a client cannot make the gateway hash or parse megabytes.
MAX_TOKEN_CHARS: Final = 4096
_PART: Final = re.compile(r"[A-Za-z0-9_-]*")
# Times in claims are seconds since 1970 up to the end of year 9999: anything else (10**400,
# which no float holds, negative times, NaN) is not a time, and refused rather than compared.
LATEST_TIME: Final = 253_402_300_799


class TokenError(Exception):
    """A token that does not grant access; `reason` is a short stable word for the client.

    Reasons: `malformed`, `bad_algorithm`, `bad_signature`, `missing_exp`, `bad_iat`,
    `expired`, `not_yet_valid`, `too_long_lived`.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def verify_token(
    token: str, secret: bytes, now: float, max_lifetime_s: float = math.inf
) -> dict[str, Any]:
    """The claims of `token` if it is an HS256 JWT signed with `secret` and valid at `now`.

    `now` is seconds since the epoch. The header's `alg` must be exactly `HS256` (never
    `none`, never another algorithm chosen by the client); the signature is compared in
    constant time before the claims are read; `exp` is required and `nbf` is honoured when
    present, both without leeway. `exp` may be at most `max_lifetime_s` after `now`, and
    after `iat` when present. Every time claim present must be a number of seconds between 0
    and LATEST_TIME; the returned `exp` is then a float-convertible number. Raises TokenError
    and nothing else, whatever the token holds; pure, safe to call from any task.
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError("malformed", f"token longer than {MAX_TOKEN_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 3 or not all(_PART.fullmatch(part) for part in parts):
        raise TokenError("malformed", "token is not three base64url parts joined by '.'")
    header_part, claims_part, signature_part = parts
    header = _json_object(header_part, "header")
    if header.get("alg") != "HS256":
        raise TokenError("bad_algorithm", "token algorithm must be HS256")
    expected = _signature(f"{header_part}.{claims_part}".encode("ascii"), secret)
    if not hmac.compare_digest(expected, _decode(signature_part, "signature")):
        raise TokenError("bad_signature", "token signature does not match")
    claims = _json_object(claims_part, "claims")
    exp = _time(claims.get("exp"))
    if exp is None:
        raise TokenError("missing_exp", "token has no 'exp' claim that is a time")
    if now >= exp:
        raise TokenError("expired", "token has expired")
    if "nbf" in claims:
        nbf = _time(claims["nbf"])
        if nbf is None or now < nbf:
            raise TokenError("not_yet_valid", "token is not valid yet ('nbf')")
    if exp - now > max_lifetime_s:
        raise TokenError("too_long_lived", f"token lives longer than {max_lifetime_s:.0f} s")
    if "iat" in claims:
        iat = _time(claims["iat"])
        if iat is None or iat > exp:
            raise TokenError("bad_iat", "token 'iat' is not a time before its 'exp'")
        if exp - iat > max_lifetime_s:
            raise TokenError("too_long_lived", f"token lives longer than {max_lifetime_s:.0f} s")
    return claims


def sign_token(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 JWT carrying `claims` (give it an `exp`); for operators' scripts and tests."""
    header = _encode(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _encode(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{body}"
    return f"{signing_input}.{_encode(_signature(signing_input.encode('ascii'), secret))}"


def _signature(signing_input: bytes, secret: bytes) -> bytes:
    return hmac.new(secret, signing_input, hashlib.sha256).digest()


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode(part: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenError("malformed", f"token {what} is not base64url") from exc


def _json_object(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_decode(part, what))
    except (ValueError, RecursionError) as exc:
        raise TokenError("malformed", f"token {what} is not JSON") from exc
    if not isinstance(value, dict):
        raise TokenError("malformed", f"token {what} is not a JSON object")
    return value


def _time(value: object) -> float | None:
    """`value` as seconds since 1970 if it is a JSON number from 0 to LATEST_TIME, else None."""
    # JSON true would pass as 1 in Python, and json accepts NaN (never expired): neither is a
    # time. Bounds are checked before any float conversion, which overflows beyond 1e308.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 <= value <= LATEST_TIME:  # False for NaN
        return None
    return float(value)
