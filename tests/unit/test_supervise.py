"""The restart policy of supervised background work."""

from __future__ import annotations

import asyncio

import pytest

from tickstream_shared.lifecycle import RestartBackoff, supervise


async def test_failing_work_is_restarted_and_reported_until_cancelled() -> None:
    """Each failure is reported and the work runs again; cancelling stops it for good."""
    runs: list[int] = []
    failures: list[BaseException] = []
    third_run = asyncio.Event()

    async def work() -> None:
        runs.append(len(runs))
        if len(runs) == 3:
            third_run.set()
            await asyncio.Event().wait()  # healthy now: runs until cancelled
        raise RuntimeError(f"bad moment {len(runs)}")

    backoff = RestartBackoff(first_s=0.01, max_s=0.02, reset_after_s=60)
    task = asyncio.create_task(supervise("work", work, backoff, failures.append))
    await asyncio.wait_for(third_run.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert runs == [0, 1, 2]
    assert [str(f) for f in failures] == ["bad moment 1", "bad moment 2"]
