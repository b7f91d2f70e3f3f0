"""`tickstream up --source live` watches the whole market unless told otherwise."""

from __future__ import annotations

from tickstream_shared.cli import live_defaults
from tickstream_shared.naming import Market
from tickstream_shared.settings import WHOLE_MARKET, ServiceSettings
from tickstream_watcher.market_spec import parse_specs
from tickstream_watcher.registry import EXCHANGES


def test_whole_market_is_usd_and_usdt_spot_of_every_registered_exchange() -> None:
    specs = parse_specs(WHOLE_MARKET)
    assert {spec.exchange for spec in specs} == set(EXCHANGES)
    assert all(spec.base == "*" and spec.quote in ("usd", "usdt") for spec in specs)
    assert any(spec.matches(Market("okx", "sol", "usdt")) for spec in specs)
    assert not any(spec.matches(Market("binance", "eth", "btc")) for spec in specs)


def test_live_defaults_fill_only_what_the_environment_leaves_unset() -> None:
    defaults = live_defaults({})
    settings = ServiceSettings.from_env({"WATCHER_SOURCE": "live", **defaults})
    assert settings.watcher.markets == WHOLE_MARKET
    assert settings.watcher.max_markets >= 1500
    assert live_defaults({"WATCHER_MARKETS": "binance:btc-usdt"}) == {
        "WATCHER_MAX_MARKETS": defaults["WATCHER_MAX_MARKETS"]
    }
    assert live_defaults({"WATCHER_MARKETS": "x", "WATCHER_MAX_MARKETS": "5"}) == {}
