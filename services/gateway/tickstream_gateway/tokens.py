"""HS256 JSON Web Tokens, sans I/O: verify a client's token; sign one for operators and tests."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from typing import Any, Final, TypeGuard

# A token is three base64url parts; anything longer than this is refused before any decoding,
# so a client cannot make the gateway hash or parse megabytes.
MAX_TOKEN_CHARS: Final = 4096
_PART: Final = re.compile(r"[A-Za-z0-9_-]*")


class TokenError(Exception):
    """A token that does not grant access; `reason` is a short stable word for the client.

    Reasons: `malformed`, `bad_algorithm`, `bad_signature`, `missing_exp`, `expired`,
    `not_yet_valid`.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def verify_token(token: str, secret: bytes, now: float) -> dict[str, Any]:
    """The claims of `token` if it is an HS256 JWT signed with `secret` and valid at `now`.

    `now` is seconds since the epoch. The header's `alg` must be exactly `HS256` (never
    `none`, never another algorithm chosen by the client); the signature is compared in
    constant time before the claims are read; `exp` is required and `nbf` is honoured when
    present, both without leeway. Raises TokenError; pure, safe to call from any task.
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
    exp = claims.get("exp")
    if not _is_number(exp):
        raise TokenError("missing_exp", "token has no numeric 'exp' claim")
    if now >= exp:
        raise TokenError("expired", "token has expired")
    nbf = claims.get("nbf")
    if nbf is not None and (not _is_number(nbf) or now < nbf):
        raise TokenError("not_yet_valid", "token is not valid yet ('nbf')")
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


def _is_number(value: object) -> TypeGuard[float]:
    # JSON true would pass as 1 in Python, and json accepts NaN (never expired): neither is a time.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
