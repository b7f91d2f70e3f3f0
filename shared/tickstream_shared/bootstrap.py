"""Creates what the services expect to exist: the alerts topic and the database schema."""

from __future__ import annotations

import logging

from tickstream_shared import db
from tickstream_shared.kafka import ensure_topics
from tickstream_shared.naming import ALERTS_TOPIC
from tickstream_shared.settings import ServiceSettings

log = logging.getLogger(__name__)


async def init(settings: ServiceSettings) -> None:
    """Create topics and schema. Idempotent: running it twice changes nothing."""
    await ensure_topics(settings.kafka, [ALERTS_TOPIC])
    pool = await db.create_pool(settings.database, max_size=1)
    try:
        await db.ensure_schema(pool, settings.database)
    finally:
        await pool.close()
    log.info("topics and schema ready")
