"""Who may use the gateway: the WebSocket's Origin check and the token on `/ws` and `/api/*`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tickstream_gateway import api
from tickstream_gateway.telemetry import WEBSOCKET_REFUSED
from tickstream_gateway.tokens import TokenError, verify_token
from tickstream_shared.redaction import TOKEN_PARAMETER, query_value, without_parameters
from tickstream_shared.settings import GatewaySettings

# Besides every WebSocket, only these paths need a token: the dashboard, /static, health and
# Prometheus stay open, as probes and scrapers carry no token and the page holds no data.
PROTECTED_HTTP_PREFIX: Final = "/api/"


@dataclass(frozen=True, slots=True)
class OriginPolicy:
    """Which browser pages may open the WebSocket, from GATEWAY_ALLOWED_ORIGINS.

    Entries are `*`, `self` (the Origin's host[:port] is the request's Host header),
    `scheme://host[:port]` (exactly that origin) or `scheme://host:*` (that scheme and host,
    any port or none); matching ignores case, as browsers send them in lower case anyway.
    """

    anything: bool
    own_host: bool
    exact: frozenset[str]
    any_port: frozenset[str]  # "scheme://host" of the `:*` entries

    @classmethod
    def parse(cls, entries: tuple[str, ...]) -> OriginPolicy:
        """The policy of validated entries (settings.py refuses malformed ones at start)."""
        lowered = [entry.lower() for entry in entries]
        return cls(
            anything="*" in lowered,
            own_host="self" in lowered,
            exact=frozenset(e for e in lowered if "://" in e and not e.endswith(":*")),
            any_port=frozenset(e.removesuffix(":*") for e in lowered if e.endswith(":*")),
        )

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether an upgrade with this Origin header, sent to this Host, may proceed.

        No Origin means the client is not a browser page (a program): the check exists to
        keep other sites' pages out, not to authenticate; that is the token's job.
        """
        if origin is None or self.anything:
            return True
        origin = origin.lower()
        if origin in self.exact:
            return True
        scheme, sep, authority = origin.partition("://")
        if not sep or scheme not in ("http", "https"):
            return False  # "null" (sandboxed frames, files) and anything odd
        if self.own_host and host is not None and authority == host.lower():
            return True
        return f"{scheme}://{_without_port(authority)}" in self.any_port


def _without_port(authority: str) -> str:
    if authority.startswith("["):  # [::1]:8000
        return authority[: authority.find("]") + 1]
    return authority.partition(":")[0]


# Key in a WebSocket's scope state: when its token expires, seconds since the epoch.
TOKEN_EXPIRES_AT = "token_expires_at"


def bearer_token(headers: Headers, query: str) -> str | None:
    """The token of `Authorization: Bearer <token>`, else of the query parameter `token`.

    `query` is the raw query string (as latin-1 text); the parameter is found by the parser
    that also redacts it from every log line (tickstream_shared.redaction), so whatever
    spelling is accepted here (`%74oken=...`) is hidden there.
    """
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return query_value(query, TOKEN_PARAMETER)


async def refuse_websocket(
    scope: Scope, receive: Receive, send: Send, response: Response, reason: str
) -> None:
    """Refuse a WebSocket upgrade with `response` (status and JSON body), before accepting;
    counted in WEBSOCKET_REFUSED under `reason` (the error code of the body).

    Servers without the ASGI denial-response extension answer a close before accept with a
    plain 403 instead.
    """
    WEBSOCKET_REFUSED.labels(reason=reason).inc()
    if "websocket.http.response" in scope.get("extensions", {}):
        await response(scope, receive, send)
    else:
        await send({"type": "websocket.close", "code": 1008})


class AccessControl:
    """ASGI middleware: Origin check on the WebSocket upgrade, token on `/ws` and `/api/*`.

    Refusals: a WebSocket upgrade from a page whose Origin is not allowed gets 403
    `forbidden_origin`; a missing or invalid token gets 401 `unauthorized` (an HTTP answer,
    or a refused upgrade with that status). Both carry the JSON error body of the HTTP API.
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: GatewaySettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.origins = OriginPolicy.parse(settings.allowed_origins)
        self.secret = settings.jwt_secret.encode() or None
        self.max_lifetime_s = settings.token_max_lifetime_s
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal: Response | None = None
        if scope["type"] == "websocket":
            headers = Headers(scope=scope)
            if not self.origins.allows(headers.get("origin"), headers.get("host")):
                origin = headers.get("origin", "")
                reason = "forbidden_origin"
                refusal = api.error(
                    403, reason, f"origin {origin[:64]!r} may not open the WebSocket"
                )
            else:
                reason = "unauthorized"
                refusal = self._check_token(scope, headers)
            if refusal is not None:
                await refuse_websocket(scope, receive, send, refusal, reason)
                return
        elif scope["type"] == "http" and scope["path"].startswith(PROTECTED_HTTP_PREFIX):
            refusal = self._check_token(scope, Headers(scope=scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check_token(self, scope: Scope, headers: Headers) -> Response | None:
        if self.secret is None:
            return None
        query = scope.get("query_string", b"").decode("latin-1")
        token = bearer_token(headers, query)
        if query_value(query, TOKEN_PARAMETER) is not None:
            # The routes never need the token, so they never see it.
            scope["query_string"] = without_parameters(query).encode("latin-1")
        if token is None:
            problem = "a token is required: query parameter 'token' or 'Authorization: Bearer'"
        else:
            try:
                claims = verify_token(token, self.secret, self.clock(), self.max_lifetime_s)
                if scope["type"] == "websocket":
                    # The connection is closed when the token expires (ws.py); uvicorn gives
                    # each connection its own copy of the lifespan state.
                    scope.setdefault("state", {})[TOKEN_EXPIRES_AT] = float(claims["exp"])
                return None
            except TokenError as exc:
                problem = exc.message
        response = api.error(401, "unauthorized", problem)
        response.headers["WWW-Authenticate"] = 'Bearer realm="tickstream"'
        return response
