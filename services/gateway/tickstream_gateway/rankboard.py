"""A ranking as read (one kind by one measure) and its views: pages, filters, a client's own."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

from tickstream_gateway.httpcache import EncodedBody
from tickstream_gateway.memo import SizedMemo
from tickstream_gateway.protocol import Frame, encode, ranks_frame
from tickstream_gateway.selection import EVERYTHING, Selection
from tickstream_shared.naming import Market, MetricKind, RankMeasure

# Views of one board kept encoded (HTTP bodies, WebSocket frames): a few hundred distinct
# pages at the default limit; dropped with the board when the ranking changes.
VIEW_BUDGET_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class RankEntry:
    """One ranked metric: its value under every measure of its kind, its mean and count."""

    metric: str
    market: Market
    measures: tuple[tuple[RankMeasure, float], ...]  # in MEASURES_BY_KIND order
    mean: float
    count: int

    def value(self, measure: RankMeasure) -> float:
        return next(v for m, v in self.measures if m == measure)

    def as_json(self, position: int, total: int, measure: RankMeasure) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "position": position,
            "total": total,
            "label": rank_label(position, total),
            "value": self.value(measure),
            **dict(self.measures),
            "mean": self.mean,
            "count": self.count,
        }


def rank_label(position: int, total: int) -> str:
    """The rank as users read it: the largest score is "1/<total>"."""
    return f"{position}/{total}"


class RankBoard:
    """Every live metric of `kind` in order of `measure`, position 1 = largest value.

    Immutable once built; the gateway replaces the board when a read differs, so views
    encoded from it (HTTP bodies and WebSocket frames) are kept with it and never stale.
    """

    def __init__(
        self,
        kind: MetricKind,
        measure: RankMeasure,
        entries: tuple[RankEntry, ...],
        warming: bool = False,
    ):
        self.kind = kind
        self.measure = measure
        self.entries = entries
        # Stats is still warming up: the board may lack markets that are publishing (see
        # `stats_warming`); told to clients rather than passing a partial board as whole.
        self.warming = warming
        # Each memo is bounded in bytes (sizes estimated for the lists: ~100 bytes an entry).
        self._compared: SizedMemo[tuple[str | None, str | None], _Compared] = SizedMemo(
            VIEW_BUDGET_BYTES, lambda c: 100 * len(c.entries) + 100
        )
        self._views: SizedMemo[Selection, _View] = SizedMemo(
            VIEW_BUDGET_BYTES, lambda v: 250 * len(v.body["ranks"]) + 100
        )
        self._bodies: SizedMemo[Selection, EncodedBody] = SizedMemo(
            VIEW_BUDGET_BYTES, lambda b: len(b.body)
        )
        self._frames: SizedMemo[tuple[Selection, tuple[str, ...]], Frame] = SizedMemo(
            VIEW_BUDGET_BYTES, lambda f: f.size
        )

    def view(self, selection: Selection, own: Collection[str] = ()) -> dict[str, Any]:
        """The `/api/ranks` body for `selection` (shared: never to be changed); with `own`
        metric ids, those of them ranked among the compared markets but not on the page come
        in `own` (WebSocket ranks), in rank order."""
        view = self._view(selection)
        if not own:
            return view.body
        compared = self._compared_by(selection)
        total = len(compared.entries)
        extra = sorted(
            (compared.positions[m], m)
            for m in own
            if m in compared.positions and m not in view.shown
        )
        entries = [compared.entries[p - 1].as_json(p, total, self.measure) for p, _ in extra]
        return {**view.body, "own": entries}

    def body(self, selection: Selection) -> EncodedBody:
        """The encoded `/api/ranks` body, built once per selection while this board holds."""
        return self._bodies.get(selection, lambda: EncodedBody.of(encode(self.view(selection))))

    def frame(self, selection: Selection = EVERYTHING, own: Collection[str] = ()) -> Frame:
        """The `ranks` frame for a subscription, shared by every client asking the same.

        Keyed by the client's own metrics that are ranked off its page, so clients whose
        markets are on the page (or unranked) share one frame. Costs dictionary lookups per
        client; the O(markets) work is done once per selection (memos of this board).
        """
        extra: tuple[str, ...] = ()
        if own:
            shown = self._view(selection).shown
            positions = self._compared_by(selection).positions
            extra = tuple(sorted(m for m in own if m in positions and m not in shown))
        return self._frames.get(
            (selection, extra), lambda: ranks_frame(self.view(selection, extra))
        )

    def _compared_by(self, selection: Selection) -> _Compared:
        key = (selection.exchange, selection.quote)
        return self._compared.get(key, lambda: _Compared.of(self.entries, selection))

    def _view(self, selection: Selection) -> _View:
        return self._views.get(selection, lambda: self._build_view(selection))

    def _build_view(self, selection: Selection) -> _View:
        compared = self._compared_by(selection).entries
        total = len(compared)
        found = [(p, e) for p, e in enumerate(compared, start=1) if selection.finds(e.market)]
        page = selection.page(found)
        body: dict[str, Any] = {
            "kind": self.kind,
            "by": self.measure,
            "total": total,
            "warming": self.warming,
            **selection.describe(len(found)),
            "ranks": [e.as_json(p, total, self.measure) for p, e in page],
        }
        return _View(body, frozenset(e.metric for _, e in page))

    def same_as(self, other: RankBoard) -> bool:
        return other.entries == self.entries and other.warming == self.warming


@dataclass(frozen=True, slots=True)
class _Compared:
    """The entries of the markets compared (an exchange, a quote), in order, and each one's
    position among them (1 = first)."""

    entries: tuple[RankEntry, ...]
    positions: dict[str, int]

    @classmethod
    def of(cls, entries: tuple[RankEntry, ...], selection: Selection) -> _Compared:
        if not selection.compares_all:
            entries = tuple(e for e in entries if selection.compares(e.market))
        return cls(entries, {e.metric: p for p, e in enumerate(entries, start=1)})


@dataclass(frozen=True, slots=True)
class _View:
    """A page of the board as a body (shared, never changed) and the metrics on it."""

    body: dict[str, Any]
    shown: frozenset[str]
