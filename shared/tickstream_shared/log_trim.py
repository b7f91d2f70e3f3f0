"""Topic retention for the local broker's S3 log, which Tansu 0.6 never trims itself.

Tansu's object-store engine keeps one object per record batch,
`clusters/<cluster>/topics/<topic>/partitions/<partition:010>/records/<offset:020>.batch`, and
finds batches by listing that folder: it accepts `retention.ms` and `retention.bytes` but
applies neither (and DeleteRecords is unimplemented). Deleting a partition's oldest batch
objects is therefore all retention takes: fetches and ListOffsets(earliest) only see what is
listed. `expired_count` decides (pure); `LogTrimmer` lists and deletes through the SeaweedFS
filer's HTTP API in a thread of its own.

SeaweedFS's filer also keeps a log of every metadata change it makes, one file per minute under
`/topics/.system/log/<yyyy-mm-dd>/` (for filer.sync and metadata subscribers, none of which the
local stack runs), and never drops it: at 100 batches a second it grew the store's disk by
about 17 MiB a minute. The trimmer deletes its minutes older than `META_LOG_KEEP_S`, as
SeaweedFS's own `fs.log.purge` would (which its master runs only for logs older than 7 days),
and asks the master to vacuum every `VACUUM_INTERVAL_S`, which is when deleted objects give
their disk back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

log = logging.getLogger(__name__)

# One listing page; the filer's own limit is 1,000 per request by default.
_PAGE: Final = 1000
_HTTP_TIMEOUT_S: Final = 10.0
# The filer's metadata change log: kept this long (a few of its one-minute files), then deleted.
META_LOG_DIR: Final = "/topics/.system/log"
META_LOG_KEEP_S: Final = 120.0
# Deleted objects free their disk only when SeaweedFS vacuums their volume. `weed mini` was seen
# never to vacuum by itself in 15 minutes (its -master.vacuumIntervalSeconds notwithstanding),
# so the trimmer asks the master for a vacuum this often; it compacts only volumes whose
# garbage passes the threshold.
VACUUM_INTERVAL_S: Final = 60.0
VACUUM_GARBAGE_THRESHOLD: Final = 0.1


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """One record batch object: its base offset, when it was written and its size."""

    offset: int
    written_ms: int
    size: int


@dataclass(frozen=True, slots=True)
class Retention:
    """A topic's retention; None where the topic sets none (or -1, Kafka's "unlimited")."""

    ms: int | None
    bytes: int | None

    @classmethod
    def from_configs(cls, configs: Mapping[str, str | None]) -> Retention:
        return cls(_limit(configs.get("retention.ms")), _limit(configs.get("retention.bytes")))


def _limit(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else -1
    except ValueError:
        return None
    return number if number >= 0 else None


def expired_count(
    batches: Sequence[StoredBatch], total_bytes: int, retention: Retention, now_ms: int
) -> int:
    """How many of `batches` (oldest first, `total_bytes` in all) are past `retention`.

    A batch goes when it was written more than `retention.ms` ago, or while the log without it
    would still hold more than `retention.bytes`. The newest batch always stays, as Kafka keeps
    its active segment: it holds the log end, and an empty partition would answer ListOffsets
    with 0 again.
    """
    count = 0
    while count < len(batches) - 1:
        batch = batches[count]
        too_old = retention.ms is not None and now_ms - batch.written_ms > retention.ms
        too_big = retention.bytes is not None and total_bytes > retention.bytes
        if not (too_old or too_big):
            break
        total_bytes -= batch.size
        count += 1
    return count


@dataclass
class _PartitionLog:
    """What is known of one partition's batches, so each pass lists only the new ones."""

    topic_id: str
    batches: deque[StoredBatch] = field(default_factory=deque)
    total_bytes: int = 0
    last_name: str = ""


@dataclass
class TrimStats:
    passes: int = 0
    deleted_batches: int = 0
    deleted_bytes: int = 0
    failures: int = 0
    deleted_meta_logs: int = 0
    vacuums: int = 0


class LogTrimmer:
    """Applies each topic's retention to Tansu's log in a SeaweedFS bucket, every `interval_s`.

    Reads the topics and their configs from Tansu's `meta.json`, so it honours exactly what
    topics were created or altered with. `start()` runs it in a daemon thread; `stop()` ends
    it (safe to call twice). A pass that fails (the filer is restarting) is logged and counted
    and the next one tries again. `trim_once()` runs one pass in the caller's thread.
    """

    def __init__(
        self,
        filer_url: str,
        bucket: str,
        cluster: str,
        interval_s: float,
        meta_log_keep_s: float = META_LOG_KEEP_S,
        master_url: str | None = None,
    ) -> None:
        self._master = master_url.rstrip("/") if master_url else None
        self._vacuumed_at = time.monotonic()
        self._filer = filer_url.rstrip("/")
        self._meta_log_keep_s = meta_log_keep_s
        self._root = f"{filer_url.rstrip('/')}/buckets/{bucket}/clusters/{cluster}"
        self._interval_s = interval_s
        self._logs: dict[tuple[str, int], _PartitionLog] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = TrimStats()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="log-trimmer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(_HTTP_TIMEOUT_S * 2)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.trim_once()
            except OSError as exc:
                self.stats.failures += 1
                log.warning("trimming the broker's log failed (%r); trying again", exc)
            except Exception:
                # An answer of a shape this trimmer does not know (another Tansu or SeaweedFS
                # version): nothing above this thread would see it, so log it whole and go on.
                self.stats.failures += 1
                log.exception("trimming the broker's log failed; trying again")

    def trim_once(self) -> None:
        """List each partition's new batches and delete those past their topic's retention."""
        topics = self._topics()
        known = {
            (name, p) for name, (_, partitions, _) in topics.items() for p in range(partitions)
        }
        for gone in [key for key in self._logs if key not in known]:
            del self._logs[gone]
        for name, (topic_id, partitions, retention) in topics.items():
            for partition in range(partitions):
                if self._stop.is_set():
                    return
                self._trim_partition(name, partition, topic_id, retention)
        self._purge_meta_log(time.time() - self._meta_log_keep_s)
        if self._master is not None and time.monotonic() - self._vacuumed_at >= VACUUM_INTERVAL_S:
            self.vacuum()
        self.stats.passes += 1

    def vacuum(self) -> None:
        """Ask the master to compact every volume past the garbage threshold (what deleting
        batches and log minutes left behind); it answers when the compaction is done."""
        if self._master is None:
            return
        query = urllib.parse.urlencode({"garbageThreshold": VACUUM_GARBAGE_THRESHOLD})
        with urllib.request.urlopen(f"{self._master}/vol/vacuum?{query}", timeout=60):
            pass
        self._vacuumed_at = time.monotonic()
        self.stats.vacuums += 1

    def _purge_meta_log(self, before_s: float) -> None:
        """Delete the filer's metadata-log minutes last written before `before_s`, and the day
        folders they leave empty (today's stays: the filer writes into it)."""
        folder = f"{self._filer}{META_LOG_DIR}"
        today = time.strftime("%Y-%m-%d", time.gmtime())
        for day, _ in self._entries(folder):
            day_folder = f"{folder}/{day}"
            minutes = self._entries(day_folder)
            old = [name for name, written in minutes if written < before_s]
            for name in old:
                self._delete(f"{day_folder}/{name}")
                self.stats.deleted_meta_logs += 1
            if day < today and len(old) == len(minutes):
                self._delete(f"{day_folder}?recursive=true")

    def _entries(self, folder: str) -> list[tuple[str, float]]:
        """Names and modification times (epoch seconds) of what `folder` holds."""
        return [
            (
                entry["FullPath"].rsplit("/", 1)[1],
                datetime.fromisoformat(entry["Mtime"]).timestamp(),
            )
            for entry in self._listing(folder, "")
        ]

    def _trim_partition(
        self, topic: str, partition: int, topic_id: str, retention: Retention
    ) -> None:
        partition_log = self._logs.get((topic, partition))
        if partition_log is None or partition_log.topic_id != topic_id:
            # New, or deleted and created again: its offsets start over.
            partition_log = self._logs[(topic, partition)] = _PartitionLog(topic_id)
        folder = f"{self._root}/topics/{_quote(topic)}/partitions/{partition:010d}/records"
        for batch, name in self._list(folder, partition_log.last_name):
            partition_log.batches.append(batch)
            partition_log.total_bytes += batch.size
            partition_log.last_name = name
        if retention.ms is None and retention.bytes is None:
            return
        now_ms = int(time.time() * 1000)
        count = expired_count(partition_log.batches, partition_log.total_bytes, retention, now_ms)
        for _ in range(count):
            batch = partition_log.batches.popleft()
            self._delete(f"{folder}/{batch.offset:020d}.batch")
            partition_log.total_bytes -= batch.size
            self.stats.deleted_batches += 1
            self.stats.deleted_bytes += batch.size

    def _topics(self) -> dict[str, tuple[str, int, Retention]]:
        meta = _get_json(f"{self._root}/meta.json")
        topics: dict[str, tuple[str, int, Retention]] = {}
        for name, entry in (meta or {}).get("topics", {}).items():
            topic = entry["topic"]
            configs = {c["name"]: c.get("value") for c in topic.get("configs") or []}
            topics[name] = (
                entry["id"],
                int(topic["num_partitions"]),
                Retention.from_configs(configs),
            )
        return topics

    def _list(self, folder: str, after: str) -> list[tuple[StoredBatch, str]]:
        found: list[tuple[StoredBatch, str]] = []
        for entry in self._listing(folder, after):
            name = entry["FullPath"].rsplit("/", 1)[1]
            if name.endswith(".batch"):
                found.append((_batch(name, entry), name))
        return found

    def _listing(self, folder: str, after: str) -> list[dict[str, Any]]:
        """The filer's entries of `folder` after the name `after`, every page of them."""
        found: list[dict[str, Any]] = []
        while True:
            query = urllib.parse.urlencode({"limit": _PAGE, "lastFileName": after})
            page = _get_json(f"{folder}/?{query}")
            entries = (page or {}).get("Entries") or []
            found += entries
            if len(entries) < _PAGE:
                return found
            after = entries[-1]["FullPath"].rsplit("/", 1)[1]

    def _delete(self, url: str) -> None:
        request = urllib.request.Request(url, method="DELETE")
        try:
            with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code != 404:  # already gone: the topic was deleted meanwhile
                raise


def _batch(name: str, entry: Mapping[str, Any]) -> StoredBatch:
    written = datetime.fromisoformat(entry["Mtime"])
    return StoredBatch(int(name[:20]), int(written.timestamp() * 1000), int(entry["FileSize"]))


def _quote(topic: str) -> str:
    return urllib.parse.quote(topic, safe="")


def _get_json(url: str) -> Any:
    """The JSON at `url`, or None where there is nothing (404)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
