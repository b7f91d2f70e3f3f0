"""Resume plans from the two close checkpoints of a watcher group."""

from __future__ import annotations

from tickstream_shared.schemas import Tick
from tickstream_watcher.checkpoints import ResumePoint, plan_resume

M = 60_000
T0 = 1_700_000_040_000


def bar(market: str, minute: int, seq: int) -> Tick:
    return Tick(market, minute, seq, minute + M, minute + M, 1.0, 1.0, 1.0, 1.0, 2.0, 3, True)


def test_a_pending_close_newer_than_the_acknowledged_one_is_republished() -> None:
    """Only closes not known to be acknowledged are sent again; points stay the acknowledged."""
    closed = {"a:x-y": ResumePoint(T0, 7), "b:x-y": ResumePoint(T0, 9)}
    closing = {"a:x-y": bar("a:x-y", T0, 7), "b:x-y": bar("b:x-y", T0 + M, 12)}
    closing["c:x-y"] = bar("c:x-y", T0, 3)
    plan = plan_resume(closed, closing)
    assert plan.points == closed
    assert plan.republish == {"b:x-y": closing["b:x-y"], "c:x-y": closing["c:x-y"]}
