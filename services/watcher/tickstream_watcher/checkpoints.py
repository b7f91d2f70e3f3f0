"""Where a publishing watcher resumes after another: close checkpoints combined into a plan.

See `leadership` for how the two checkpoints are written; this is the pure part.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tickstream_shared.schemas import Tick


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """A market's newest acknowledged closed minute and the newest seq checkpointed."""

    minute: int
    seq: int


@dataclass(frozen=True, slots=True)
class ResumePlan:
    points: dict[str, ResumePoint]
    republish: dict[str, Tick]  # closed bars maybe never acknowledged: sent again, as they were


def plan_resume(closed: Mapping[str, ResumePoint], closing: Mapping[str, Tick]) -> ResumePlan:
    """Combine the two checkpoints (see the module doc) into a resume plan per market."""
    republish = {
        market_id: tick
        for market_id, tick in closing.items()
        if (done := closed.get(market_id)) is None or tick.minute > done.minute
    }
    return ResumePlan(dict(closed), republish)
