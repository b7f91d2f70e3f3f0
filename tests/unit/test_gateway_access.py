"""Origin matching, token extraction, the command token bucket and the access settings."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from tickstream_gateway.access import OriginPolicy, bearer_token
from tickstream_gateway.token_bucket import TokenBucket, Verdict
from tickstream_shared.errors import ConfigError
from tickstream_shared.settings import DEFAULT_ALLOWED_ORIGINS, GatewaySettings, ServiceSettings

DEFAULT = OriginPolicy.parse(DEFAULT_ALLOWED_ORIGINS)
HOST = "gateway.example:8000"


@pytest.mark.parametrize(
    "origin",
    [
        None,  # a program, not a browser page
        "http://gateway.example:8000",  # the gateway's own page (self)
        "http://localhost",
        "http://localhost:5173",
        "https://localhost:8443",
        "http://127.0.0.1:3000",
        "HTTP://LOCALHOST:3000",
    ],
)
def test_default_policy_allows_own_origin_localhost_and_programs(origin: str | None) -> None:
    """By default the gateway's own origin, localhost on any port and no Origin may connect."""
    assert DEFAULT.allows(origin, HOST)


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "http://gateway.example:9000",  # another port is another origin
        "https://gateway.example",
        "http://localhost.evil.example",
        "http://127.0.0.1.evil.example:80",
        "null",  # sandboxed frames and file:// pages
        "ws://localhost:8000",
        "",
    ],
)
def test_default_policy_refuses_other_pages(origin: str) -> None:
    """Any other origin, `null` and non-http schemes are refused by default."""
    assert not DEFAULT.allows(origin, HOST)


def test_listed_origins_replace_the_defaults() -> None:
    """Exact entries match only themselves; `:*` matches any port of that scheme and host."""
    policy = OriginPolicy.parse(("https://dash.example.com", "http://[::1]:*"))
    assert policy.allows("https://dash.example.com", HOST)
    assert policy.allows("https://DASH.example.com", HOST)
    assert not policy.allows("https://dash.example.com:8443", HOST)
    assert not policy.allows("http://dash.example.com", HOST)
    assert policy.allows("http://[::1]:8000", HOST)
    assert policy.allows("http://[::1]", HOST)
    assert not policy.allows("http://localhost:8000", HOST)
    assert not policy.allows("http://gateway.example:8000", HOST)  # no `self` listed
    assert policy.allows(None, HOST)


def test_star_allows_every_origin_and_empty_allows_none() -> None:
    """`*` allows any Origin; an empty list refuses every browser page but not programs."""
    assert OriginPolicy.parse(("*",)).allows("https://evil.example", HOST)
    nothing = OriginPolicy.parse(())
    assert not nothing.allows("http://gateway.example:8000", HOST)
    assert nothing.allows(None, HOST)


def test_self_compares_with_the_host_header() -> None:
    """`self` matches an Origin naming the Host the request was sent to, and nothing else."""
    own = OriginPolicy.parse(("self",))
    assert own.allows("https://gateway.example", "Gateway.Example")
    assert not own.allows("https://gateway.example", "gateway.example:8443")
    assert not own.allows("https://gateway.example", None)


def test_token_comes_from_bearer_header_before_query() -> None:
    """`Authorization: Bearer` wins over the `token` query parameter; other schemes are ignored."""
    query = "token=from-query"
    assert bearer_token(Headers({"authorization": "Bearer abc.def.ghi"}), query) == "abc.def.ghi"
    assert bearer_token(Headers({"authorization": "bearer  xyz "}), query) == "xyz"
    assert bearer_token(Headers({"authorization": "Basic dXNlcjpwdw=="}), query) == "from-query"
    assert bearer_token(Headers({"authorization": "Bearer "}), query) == "from-query"
    assert bearer_token(Headers({}), "") is None
    assert bearer_token(Headers({}), "kind=price&%74o%6Ben=encoded") == "encoded"


def test_bucket_allows_a_burst_then_refuses_then_closes() -> None:
    """Burst commands pass; the next `burst` are refused; the one after that closes."""
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    verdicts = [bucket.take(0.0) for _ in range(8)]
    assert verdicts == [Verdict.ALLOW] * 3 + [Verdict.REFUSE] * 3 + [Verdict.CLOSE] * 2


def test_bucket_refills_at_the_rate_and_never_beyond_burst() -> None:
    """Tokens come back at `rate` per second, up to `burst`, however long the pause."""
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [Verdict.ALLOW] * 3
    assert bucket.take(0.25) is Verdict.REFUSE  # half a token: not enough, and now in debt
    assert bucket.take(1.25) is Verdict.ALLOW  # -0.5 + 2 tokens
    assert [bucket.take(100.0) for _ in range(4)] == [Verdict.ALLOW] * 3 + [Verdict.REFUSE]


def test_refused_commands_keep_a_fast_client_refused() -> None:
    """A client sending at twice the rate runs down the burst, is refused, then closed."""
    bucket = TokenBucket(rate=8.0, burst=5, now=0.0)
    # One command every 1/16 s gains half a token: the balance falls by half a token each.
    verdicts = [bucket.take(i / 16) for i in range(21)]
    assert verdicts == [Verdict.ALLOW] * 9 + [Verdict.REFUSE] * 10 + [Verdict.CLOSE] * 2


def test_a_clock_running_back_gives_no_tokens() -> None:
    """A `now` earlier than the last one counts as no time passed."""
    bucket = TokenBucket(rate=1000.0, burst=1, now=10.0)
    assert bucket.take(10.0) is Verdict.ALLOW
    assert bucket.take(5.0) is Verdict.REFUSE


def test_access_settings_defaults_and_bounds() -> None:
    """Limits have documented defaults; values outside their bounds stop the service."""
    gateway = ServiceSettings.from_env({}).gateway
    assert (gateway.max_connections, gateway.max_subscriptions) == (10_000, 100)
    assert (gateway.max_commands_per_s, gateway.command_burst) == (20.0, 100)
    assert (gateway.jwt_secret, gateway.allowed_origins) == ("", DEFAULT_ALLOWED_ORIGINS)
    for env, bad in [
        ("GATEWAY_MAX_CONNECTIONS", "0"),
        ("GATEWAY_MAX_SUBSCRIPTIONS", "0"),
        ("GATEWAY_MAX_COMMANDS_PER_S", "0"),
        ("GATEWAY_COMMAND_BURST", "0"),
    ]:
        with pytest.raises(ConfigError, match=env):
            ServiceSettings.from_env({env: bad})


@pytest.mark.parametrize(
    "origins",
    ["https://dash.example.com/", "dash.example.com", "ftp://x", "https://x:port", "self,*x"],
)
def test_malformed_allowed_origins_stop_the_service(origins: str) -> None:
    """An origin with a path, no scheme, another scheme or a bad port is a ConfigError."""
    with pytest.raises(ConfigError, match="GATEWAY_ALLOWED_ORIGINS"):
        ServiceSettings.from_env({"GATEWAY_ALLOWED_ORIGINS": origins})


def test_allowed_origins_are_read_as_a_list() -> None:
    """The variable is comma separated; blanks around entries are dropped."""
    settings = ServiceSettings.from_env(
        {"GATEWAY_ALLOWED_ORIGINS": " self , https://dash.example.com, http://localhost:* "}
    )
    assert settings.gateway.allowed_origins == (
        "self",
        "https://dash.example.com",
        "http://localhost:*",
    )


def test_jwt_secret_is_long_enough_and_never_printed() -> None:
    """A secret shorter than 32 bytes stops the service; the settings' repr leaves it out."""
    with pytest.raises(ConfigError, match="GATEWAY_JWT_SECRET"):
        ServiceSettings.from_env({"GATEWAY_JWT_SECRET": "s" * 31})
    settings = ServiceSettings.from_env({"GATEWAY_JWT_SECRET": "s" * 32})
    assert settings.gateway.jwt_secret == "s" * 32
    assert "sss" not in repr(settings) and "jwt_secret" not in repr(GatewaySettings())
