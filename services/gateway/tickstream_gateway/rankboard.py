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

    def __init__(self, kind: MetricKind, measure: RankMeasure, entries: tuple[RankEntry, ...]):
        self.kind = kind
        self.measure = measure
        self.entries = entries
        self._by_metric = {e.metric: e for e in entries}
        self._bodies: SizedMemo[Selection, EncodedBody] = SizedMemo(
            VIEW_BUDGET_BYTES, lambda b: len(b.body)
        )
        self._frames: SizedMemo[tuple[Selection, tuple[str, ...]], Frame] = SizedMemo(
            VIEW_BUDGET_BYTES, lambda f: f.size
        )
        # The metric ids on each page asked for (about 50 bytes each).
        self._pages: SizedMemo[Selection, frozenset[str]] = SizedMemo(
            VIEW_BUDGET_BYTES, lambda page: 50 * len(page) + 50
        )

    def view(self, selection: Selection, own: Collection[str] = ()) -> dict[str, Any]:
        """The `/api/ranks` body for `selection`; with `own` metric ids, those of them ranked
        among the compared markets but not on the page come in `own` (WebSocket ranks)."""
        compared = (
            self.entries
            if selection.compares_all
            else tuple(e for e in self.entries if selection.compares(e.market))
        )
        total = len(compared)
        found = [(p, e) for p, e in enumerate(compared, start=1) if selection.finds(e.market)]
        page = selection.page(found)
        body: dict[str, Any] = {
            "kind": self.kind,
            "by": self.measure,
            "total": total,
            **selection.describe(len(found)),
            "ranks": [e.as_json(p, total, self.measure) for p, e in page],
        }
        if own:
            shown = {e.metric for _, e in page}
            body["own"] = [
                e.as_json(p, total, self.measure)
                for p, e in enumerate(compared, start=1)
                if e.metric in own and e.metric not in shown
            ]
        return body

    def body(self, selection: Selection) -> EncodedBody:
        """The encoded `/api/ranks` body, built once per selection while this board holds."""
        return self._bodies.get(selection, lambda: EncodedBody.of(encode(self.view(selection))))

    def frame(self, selection: Selection = EVERYTHING, own: Collection[str] = ()) -> Frame:
        """The `ranks` frame for a subscription, shared by every client asking the same.

        Keyed by the client's own metrics that are ranked off its page, so clients whose
        markets are on the page (or unranked) share one frame.
        """
        page = self._pages.get(selection, lambda: self._page_metrics(selection))
        extra = tuple(
            sorted(
                m
                for m in own
                if m not in page
                and (entry := self._by_metric.get(m)) is not None
                and selection.compares(entry.market)
            )
        )
        return self._frames.get(
            (selection, extra), lambda: ranks_frame(self.view(selection, extra))
        )

    def _page_metrics(self, selection: Selection) -> frozenset[str]:
        found = [
            e for e in self.entries if selection.compares(e.market) and selection.finds(e.market)
        ]
        return frozenset(e.metric for e in selection.page(found))

    def same_as(self, other: RankBoard) -> bool:
        return other.entries == self.entries
