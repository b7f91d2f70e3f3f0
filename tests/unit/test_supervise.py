"""The restart policy of supervised background work."""

from __future__ import annotations

import asyncio

import pytest

from tickstream_shared.lifecycle import RestartBackoff, run_until_stopped, supervise
from tickstream_shared.settings import ServiceSettings


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


async def test_a_service_that_fails_on_a_dependency_starts_again_until_it_ends() -> None:
    """Transient failures (PostgreSQL shutting down while the service starts) run the body
    again after the backoff; when it returns, so does run_until_stopped."""
    runs = 0

    async def body(settings: ServiceSettings, stop: asyncio.Event) -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise ConnectionRefusedError(111, "the database system is shutting down")

    backoff = RestartBackoff(first_s=0.01, max_s=0.02)
    await asyncio.wait_for(
        run_until_stopped("svc", body, ServiceSettings(), asyncio.Event(), backoff), 5
    )
    assert runs == 3


async def test_a_bug_ends_the_service_and_stop_ends_the_wait() -> None:
    """A non-transient error is raised at once; a stop during the wait before a restart ends
    run_until_stopped without running the body again."""

    async def buggy(settings: ServiceSettings, stop: asyncio.Event) -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        await run_until_stopped("svc", buggy, ServiceSettings(), asyncio.Event())

    async def no_folder(settings: ServiceSettings, stop: asyncio.Event) -> None:
        raise FileNotFoundError("WATCHER_REPLAY_DIR /nowhere is not a folder")

    with pytest.raises(FileNotFoundError):  # an OSError, but no wait brings the folder
        await run_until_stopped("svc", no_folder, ServiceSettings(), asyncio.Event())

    runs = 0
    stop = asyncio.Event()

    async def away(settings: ServiceSettings, stop_: asyncio.Event) -> None:
        nonlocal runs
        runs += 1
        # The operator stops the service while it waits a minute to start again.
        asyncio.get_running_loop().call_soon(stop.set)
        raise OSError("Redis is away")

    backoff = RestartBackoff(first_s=60.0)
    await asyncio.wait_for(run_until_stopped("svc", away, ServiceSettings(), stop, backoff), 5)
    assert runs == 1
