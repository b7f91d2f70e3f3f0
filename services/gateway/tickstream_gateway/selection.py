"""Which part of a listing a client asked for: the markets compared, a search text, a page."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from tickstream_gateway.errors import ProtocolError
from tickstream_shared.errors import echo
from tickstream_shared.naming import Market

T = TypeVar("T")

# A page holds at most MAX_LIMIT entries (about 220 bytes each in a rank listing), so no answer
# grows with the market; DEFAULT_LIMIT when a client names none.
MAX_LIMIT: Final = 1000
DEFAULT_LIMIT: Final = 100
# Far beyond any real listing (WATCHER_MAX_MARKETS is at most 5,000 markets): only bounds the int.
MAX_OFFSET: Final = 100_000
# A WebSocket `ranks` subscription: entries per frame by default and at most. A frame goes out
# at each change of its ranking (at most once per GATEWAY_RANK_INTERVAL_MS), so a client's
# bytes per second are bounded by these, never by the number of markets.
RANK_FRAME_LIMIT: Final = 20
MAX_FRAME_RANKS: Final = 100
MAX_SEARCH_CHARS: Final = 64
_NAME: Final = re.compile(r"[a-z0-9]{1,32}")
_SEARCH: Final = re.compile(rf"[a-z0-9:-]{{1,{MAX_SEARCH_CHARS}}}")
_COUNT: Final = re.compile(r"[0-9]{1,7}")


@dataclass(frozen=True, slots=True)
class Selection:
    """Markets compared (`exchange`, `quote`), then those whose id holds `search`, one page.

    Positions are counted among the markets compared: a listing of USDT markets ranks like
    with like. `search`, `offset` and `limit` only cut what is listed, never renumber it.
    `limit` None lists everything (the gateway's own use, never a client's).
    """

    exchange: str | None = None
    quote: str | None = None
    search: str | None = None
    offset: int = 0
    limit: int | None = DEFAULT_LIMIT

    def compares(self, market: Market) -> bool:
        """Whether `market` is among the markets ranked against each other."""
        return (self.exchange is None or market.exchange == self.exchange) and (
            self.quote is None or market.quote == self.quote
        )

    @property
    def compares_all(self) -> bool:
        return self.exchange is None and self.quote is None

    def finds(self, market: Market) -> bool:
        """Whether the market's id holds the search text (every market without one)."""
        return self.search is None or self.search in market.id

    def page(self, items: Sequence[T]) -> Sequence[T]:
        end = None if self.limit is None else self.offset + self.limit
        return items[self.offset : end]

    def describe(self, matching: int) -> dict[str, int | None]:
        """The page's place in the listing: `matching` entries found, from `offset`."""
        return {"matching": matching, "offset": self.offset, "limit": self.limit}


EVERYTHING: Final = Selection(limit=None)


def parse_selection(
    params: Mapping[str, str], default_limit: int = DEFAULT_LIMIT, max_limit: int = MAX_LIMIT
) -> Selection:
    """The selection named by HTTP query parameters (or a WebSocket command's fields, as text).

    `exchange`, `quote`: a name of `[a-z0-9]` (1..32, case-insensitive); `q`: search text of
    `[a-z0-9:-]` (1..64, case-insensitive; empty means none); `limit` 1..max_limit; `offset`
    0..MAX_OFFSET. Raises ProtocolError (`bad_exchange`, `bad_quote`, `bad_query`,
    `bad_limit`, `bad_offset`) naming the parameter and echoing at most the start of its value.
    """
    exchange = _name(params, "exchange", "bad_exchange")
    quote = _name(params, "quote", "bad_quote")
    search: str | None = None
    raw_search = params.get("q")
    if raw_search is not None and raw_search.strip():
        search = raw_search.strip().lower()
        if not _SEARCH.fullmatch(search):
            raise ProtocolError(
                "bad_query",
                f"q {echo(raw_search)} must be 1 to {MAX_SEARCH_CHARS} of a-z, 0-9, ':' and '-'",
            )
    limit = _count(params, "limit", "bad_limit", default_limit, 1, max_limit)
    offset = _count(params, "offset", "bad_offset", 0, 0, MAX_OFFSET)
    return Selection(exchange, quote, search, offset, limit)


def _name(params: Mapping[str, str], field: str, code: str) -> str | None:
    raw = params.get(field)
    if raw is None:
        return None
    name = raw.strip().lower()
    if not _NAME.fullmatch(name):
        raise ProtocolError(code, f"{field} {echo(raw)} must be 1 to 32 of a-z and 0-9")
    return name


def _count(
    params: Mapping[str, str], field: str, code: str, default: int, lowest: int, highest: int
) -> int:
    raw = params.get(field)
    if raw is None:
        return default
    if not _COUNT.fullmatch(raw.strip()):
        raise ProtocolError(code, f"{field} {echo(raw)} is not an integer in {lowest}..{highest}")
    value = int(raw)
    if not lowest <= value <= highest:
        raise ProtocolError(code, f"{field} must be between {lowest} and {highest}, not {value}")
    return value
