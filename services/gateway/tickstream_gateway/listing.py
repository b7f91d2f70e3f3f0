"""The `/api/metrics` listing as read, and its views: pages, filters, positions among a set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tickstream_gateway.httpcache import EncodedBody
from tickstream_gateway.memo import SizedMemo
from tickstream_gateway.protocol import encode
from tickstream_gateway.rankboard import VIEW_BUDGET_BYTES
from tickstream_gateway.ranks import RANKINGS, MetricStats, Ranking, positions_json
from tickstream_gateway.selection import Selection
from tickstream_shared.feed_status import ReportedState
from tickstream_shared.naming import MetricId, RankMeasure


def metric_json(
    metric: MetricId,
    stats: MetricStats,
    positions: Mapping[RankMeasure, tuple[int | None, int]],
    feed: ReportedState | None,
) -> dict[str, Any]:
    return {
        "id": str(metric),
        "market": metric.market.id,
        "kind": metric.kind,
        **stats.as_json(),
        **positions_json(positions),
        "feed": feed,
    }


@dataclass(frozen=True, slots=True)
class ListedMetric:
    metric: MetricId
    stats: MetricStats
    feed: ReportedState | None  # its market's feed state as shown when read


class MetricsListing:
    """Every metric with stats (stale ones too) sorted by id, the live order of every ranking,
    and the feed reports, as read at one moment. Views of it are encoded once each."""

    def __init__(
        self,
        metrics: tuple[ListedMetric, ...],
        live_orders: Mapping[Ranking, list[str]],
        feeds: Mapping[str, dict[str, object]],
        origins: Mapping[str, Any],
    ) -> None:
        self.metrics = metrics
        self._live_orders = live_orders
        self._feeds = feeds
        self._origins = origins
        self._by_id = {str(m.metric): m.metric for m in metrics}
        self._bodies: SizedMemo[Selection, EncodedBody] = SizedMemo(
            VIEW_BUDGET_BYTES, lambda b: len(b.body)
        )

    def view(self, selection: Selection) -> dict[str, Any]:
        """The `/api/metrics` body: the page of metrics of the compared markets whose id holds
        the search text; positions among the compared markets; the page's markets' feeds."""
        found = [
            m
            for m in self.metrics
            if selection.compares(m.metric.market) and selection.finds(m.metric.market)
        ]
        page = selection.page(found)
        positions = self._positions(selection, {str(m.metric) for m in page})
        listed = [metric_json(m.metric, m.stats, positions[str(m.metric)], m.feed) for m in page]
        markets = sorted({m.metric.market.id for m in page})
        return {
            "metrics": listed,
            **selection.describe(len(found)),
            "origins": self._origins,
            "feeds": {market: self._feeds[market] for market in markets if market in self._feeds},
        }

    def body(self, selection: Selection) -> EncodedBody:
        return self._bodies.get(selection, lambda: EncodedBody.of(encode(self.view(selection))))

    def _positions(
        self, selection: Selection, shown: set[str]
    ) -> dict[str, dict[RankMeasure, tuple[int | None, int]]]:
        positions: dict[str, dict[RankMeasure, tuple[int | None, int]]] = {m: {} for m in shown}
        for kind, measure in RANKINGS:
            order = self._live_orders.get((kind, measure), [])
            if not selection.compares_all:
                order = [m for m in order if selection.compares(self._by_id[m].market)]
            index = {metric_id: i for i, metric_id in enumerate(order, start=1)}
            for metric_id in shown:
                if self._by_id[metric_id].kind == kind:
                    positions[metric_id][measure] = (index.get(metric_id), len(order))
        return positions
