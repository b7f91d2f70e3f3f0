"""Session fixtures: real broker, Redis and PostgreSQL started from wheels, shared by the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest

from tickstream_shared.local_infra import LocalInfra

# Property tests check results, never time: hypothesis's default 200 ms deadline per example
# would fail them on a busy machine (tests assert no timings; bench/ measures speed).
hypothesis.settings.register_profile("tickstream", deadline=None)
hypothesis.settings.load_profile("tickstream")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CANDLES = SHARED_DATA / "candles"
# One factor scales every deadline, for slow machines: TICKSTREAM_TEST_TIMEOUT_FACTOR=3.
TIMEOUT_FACTOR = float(os.environ.get("TICKSTREAM_TEST_TIMEOUT_FACTOR", "1"))


def deadline(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


def unique_exchange() -> str:
    """An exchange name no other test uses, so topics, keys and rows never collide."""
    return f"t{uuid.uuid4().hex[:10]}"


def require_candles() -> Path:
    if not CANDLES.is_dir():
        pytest.skip(f"candle data not found at {CANDLES} (the shared/ folder beside the repo)")
    return CANDLES


def make_data_dir(prefix: str) -> Path:
    # Traversable by the unprivileged user PostgreSQL runs as when tests run as root.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def running_infra(prefix: str) -> Iterator[LocalInfra]:
    """Broker, Redis and PostgreSQL of their own, under a data folder removed afterwards."""
    data_dir = make_data_dir(prefix)
    try:
        with LocalInfra(data_dir) as running:
            yield running
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def infra() -> Iterator[LocalInfra]:
    with running_infra("tickstream-test-") as running:
        yield running
