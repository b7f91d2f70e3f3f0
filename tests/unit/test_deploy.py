"""docker-compose.yml, deploy/Dockerfile and deploy/k8s checked against the settings and the CLI."""

from __future__ import annotations

import asyncio
import fnmatch
import importlib
import json
import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from starlette.requests import Request
from starlette.routing import Route

from tickstream_gateway.app import create_app
from tickstream_gateway.bars import RecentBars
from tickstream_gateway.history import MarketHistory
from tickstream_gateway.hub import Hub
from tickstream_gateway.state import GatewayState
from tickstream_shared import health
from tickstream_shared.settings import ServiceSettings, documented_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S = ROOT / "deploy" / "k8s" / "tickstream.yaml"

IMAGE = "tickstream:latest"
BUILD = {"context": ".", "dockerfile": "deploy/Dockerfile"}
SETTINGS = frozenset(env for _, env, _, _ in documented_settings())
DEFAULTS = {env: default for _, env, default, _ in documented_settings()}

# Which infrastructure each process talks to, named by the variable that locates it.
KAFKA, REDIS, DATABASE = "KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "DATABASE_URL"
# The watcher's Redis holds the lease that lets only one of its instances publish.
NEEDS = {
    "init": {KAFKA, DATABASE},
    "watcher": {KAFKA, REDIS},
    "stats": {KAFKA, REDIS, DATABASE},
    "alerts": {KAFKA, DATABASE},
    "gateway": {KAFKA, REDIS, DATABASE},
}
# Instances per process: two watchers, one publishing and one standing by; one of the others.
INSTANCES = {"init": 1, "watcher": 2, "stats": 1, "alerts": 1, "gateway": 1}
REDIS_PORT = 6379
POSTGRES_PORT = 5432
# The operator's environment for the synthetic source, as documented in docs/operations.md.
SYNTHETIC = {"WATCHER_SOURCE": "synthetic"}


@pytest.fixture(scope="module")
def cli_commands() -> frozenset[str]:
    """Subcommands of the `tickstream` console script, read from the CLI module itself."""
    cli = importlib.import_module("tickstream_shared.cli")
    return frozenset(cli.COMMANDS)


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    """docker-compose.yml as written, before Compose substitutes `${...}`."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    """docker-compose.yml as `docker compose up` reads it when the operator sets nothing."""
    data: dict[str, Any] = _interpolate(raw_compose, {})
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


@pytest.fixture(scope="module")
def tickstream(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Compose services that run the tickstream image."""
    return {name: svc for name, svc in services.items() if _is_tickstream(svc)}


@pytest.fixture(scope="module")
def infra(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Compose service name of the infrastructure behind each locating variable."""
    return {
        KAFKA: _only(services, "apache/kafka:"),
        REDIS: _only(services, "redis:"),
        DATABASE: _only(services, "timescale/timescaledb:"),
    }


def _is_tickstream(svc: dict[str, Any]) -> bool:
    build = svc.get("build")
    dockerfile = build.get("dockerfile") if isinstance(build, dict) else None
    return svc.get("image", "").split(":")[0] == "tickstream" or dockerfile == BUILD["dockerfile"]


# `$$`, `${VAR}`, `${VAR:-default}`, `${VAR-default}` or `$VAR`; anything else after `$` fails.
_SUBSTITUTION = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?-)([^$}]*))?\}|(\w+))")


def _interpolate(value: Any, environ: Mapping[str, str]) -> Any:
    """Compose's variable substitution applied to every string in `value`, from `environ`."""
    if isinstance(value, dict):
        return {k: _interpolate(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, environ) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        escaped, name, operator, default, bare = match.groups()
        if escaped:
            return "$"
        if bare:
            return environ.get(bare, "")
        if operator == ":-":
            return environ.get(name) or default
        if operator == "-":
            return environ.get(name, default)
        return environ.get(name, "")

    result = _SUBSTITUTION.sub(substitute, value)
    unsupported = _SUBSTITUTION.sub("", value)
    assert "$" not in unsupported, f"substitution this test cannot read: {value!r}"
    return result


def _substituted_names(value: str) -> set[str]:
    """Variables of the operator's environment that a compose string reads."""
    return {m[1] or m[4] for m in _SUBSTITUTION.findall(value) if not m[0]}


def _only(services: dict[str, dict[str, Any]], image_prefix: str) -> str:
    names = [n for n, svc in services.items() if svc.get("image", "").startswith(image_prefix)]
    assert len(names) == 1, f"expected one service with image {image_prefix}*, found {names}"
    return names[0]


def _environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _words(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def _replicas(svc: dict[str, Any]) -> int:
    return int(svc.get("deploy", {}).get("replicas", svc.get("scale", 1)))


def _depends_on(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: cfg.get("condition", "service_started") for name, cfg in deps.items()}


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """`NAME://host:port,...` as {NAME: (host, port)}."""
    result = {}
    for item in value.split(","):
        name, address = item.split("://", 1)
        host, port = address.rsplit(":", 1)
        result[name] = (host, int(port))
    return result


def test_compose_runs_exactly_the_tickstream_processes(
    tickstream: dict[str, dict[str, Any]],
) -> None:
    """The compose file runs init and the four services from the tickstream image, no more."""
    assert set(tickstream) == set(NEEDS)


def test_compose_services_share_one_image(tickstream: dict[str, dict[str, Any]]) -> None:
    """Every tickstream service builds deploy/Dockerfile from the repo root as tickstream:latest."""
    for name, svc in tickstream.items():
        assert (svc.get("image"), svc.get("build")) == (IMAGE, BUILD), name


def test_compose_commands_are_cli_subcommands(
    tickstream: dict[str, dict[str, Any]], cli_commands: frozenset[str]
) -> None:
    """Each tickstream service's command starts with a subcommand the CLI really has."""
    for name, svc in tickstream.items():
        assert _words(svc["command"])[0] in cli_commands, name


def test_compose_service_runs_its_own_subcommand(tickstream: dict[str, dict[str, Any]]) -> None:
    """The compose service named X runs exactly `tickstream X`, so no two are swapped."""
    for name, svc in tickstream.items():
        assert _words(svc["command"]) == [name]


def test_compose_environment_names_are_settings(tickstream: dict[str, dict[str, Any]]) -> None:
    """Every variable set on a tickstream service is a documented setting."""
    for name, svc in tickstream.items():
        assert set(_environment(svc)) - SETTINGS == set(), name


def test_compose_environment_has_what_each_service_needs(
    tickstream: dict[str, dict[str, Any]],
) -> None:
    """Each service is told where the Kafka, Redis and database it talks to are."""
    for name, svc in tickstream.items():
        assert NEEDS[name] - set(_environment(svc)) == set(), name


def test_compose_kafka_is_single_node_kraft(
    services: dict[str, dict[str, Any]], infra: dict[str, str]
) -> None:
    """Kafka runs as combined KRaft broker and controller, advertised under its service name."""
    name = infra[KAFKA]
    env = _environment(services[name])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = {n: port for n, (_, port) in _listeners(env["KAFKA_LISTENERS"]).items()}
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == (
        f"{env['KAFKA_NODE_ID']}@{name}:{listeners[controller]}"
    )
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    assert advertised == {"PLAINTEXT": (name, listeners["PLAINTEXT"])}
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_compose_kafka_is_4x_without_zookeeper(
    services: dict[str, dict[str, Any]], infra: dict[str, str]
) -> None:
    """Kafka is a pinned 4.x image (KRaft only), with a cluster id of its own, no ZooKeeper and
    no setting Kafka 4 removed."""
    svc = services[infra[KAFKA]]
    repository, _, tag = svc["image"].partition(":")
    assert repository == "apache/kafka"
    assert re.fullmatch(r"4\.\d+\.\d+", tag), tag
    env = _environment(svc)
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"])
    assert env["CLUSTER_ID"] != "5L6g3nShT-eMCtK--X86sw"  # the image's built-in default
    removed = {
        "KAFKA_ZOOKEEPER_CONNECT",
        "KAFKA_LOG_MESSAGE_FORMAT_VERSION",
        "KAFKA_INTER_BROKER_PROTOCOL_VERSION",
        "KAFKA_MESSAGE_DOWNCONVERSION_ENABLE",
    }
    assert removed & set(env) == set()


def test_compose_timescaledb_keeps_its_data(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], infra: dict[str, str]
) -> None:
    """TimescaleDB has a password, the tickstream database and a declared named volume."""
    svc = services[infra[DATABASE]]
    env = _environment(svc)
    assert env["POSTGRES_PASSWORD"] != ""
    assert env["POSTGRES_DB"] == "tickstream"
    volumes = [v.split(":")[0] for v in svc["volumes"]]
    assert volumes == ["timescaledb-data"]
    assert set(volumes) <= set(compose.get("volumes") or {})


def test_compose_infra_has_healthchecks(
    services: dict[str, dict[str, Any]], infra: dict[str, str]
) -> None:
    """Kafka, Redis and TimescaleDB have healthchecks, which service_healthy waits on."""
    for name in infra.values():
        assert services[name]["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}, name


def test_compose_urls_point_at_infra(
    services: dict[str, dict[str, Any]],
    tickstream: dict[str, dict[str, Any]],
    infra: dict[str, str],
) -> None:
    """Kafka, Redis and database addresses name the infra services and the ports they serve."""
    kafka_env = _environment(services[infra[KAFKA]])
    brokers = {f"{h}:{p}" for h, p in _listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"]).values()}
    db_env = _environment(services[infra[DATABASE]])
    for name, svc in tickstream.items():
        env = _environment(svc)
        if KAFKA in env:
            assert set(env[KAFKA].split(",")) <= brokers, name
        if REDIS in env:
            url = urlsplit(env[REDIS])
            assert (url.scheme, url.hostname, url.port) == ("redis", infra[REDIS], REDIS_PORT)
        if DATABASE in env:
            url = urlsplit(env[DATABASE])
            assert (url.scheme, url.hostname, url.port) == (
                "postgresql",
                infra[DATABASE],
                POSTGRES_PORT,
            )
            assert url.username == db_env.get("POSTGRES_USER", "postgres"), name
            assert url.password == db_env["POSTGRES_PASSWORD"], name
            assert url.path == f"/{db_env['POSTGRES_DB']}", name


def test_compose_depends_on_the_infra_it_talks_to(
    tickstream: dict[str, dict[str, Any]], infra: dict[str, str]
) -> None:
    """Each service waits for exactly its infra to be healthy and, but for init, for init."""
    for name, svc in tickstream.items():
        env = _environment(svc)
        expected = {infra[var]: "service_healthy" for var in infra if var in env}
        if name != "init":
            expected["init"] = "service_completed_successfully"
        assert _depends_on(svc) == expected, name


def test_compose_restart_policies(tickstream: dict[str, dict[str, Any]]) -> None:
    """init runs once; the long-running services are restarted unless stopped."""
    policies = {name: svc.get("restart") for name, svc in tickstream.items()}
    assert policies == {name: "no" if name == "init" else "unless-stopped" for name in NEEDS}


def test_compose_gateway_is_published_and_health_checked(
    tickstream: dict[str, dict[str, Any]],
) -> None:
    """The gateway listens on all interfaces, publishes its port, and probes its /healthz."""
    svc = tickstream["gateway"]
    env = _environment(svc)
    port = int(env.get("GATEWAY_PORT", DEFAULTS["GATEWAY_PORT"]))
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    assert [str(p) for p in svc["ports"]] == [f"{port}:{port}"]
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert f"urlopen('http://127.0.0.1:{port}/healthz'" in test[3]


def _probe_port(name: str, env: Mapping[str, str]) -> int:
    """The port a service serves /metrics, /livez and /readyz on, as its settings say."""
    settings = ServiceSettings.from_env(env)
    return settings.gateway.port if name == "gateway" else settings.observability.port_of(name)


def test_compose_services_serve_probes_on_ports_of_their_own(
    tickstream: dict[str, dict[str, Any]],
) -> None:
    """Watcher, stats and alerts serve probes on unpublished ports of their own; health: /readyz."""
    ports = {}
    for name in ("watcher", "stats", "alerts"):
        svc = tickstream[name]
        env = _environment(svc)
        port = ports[name] = _probe_port(name, env)
        assert port != 0 and env["METRICS_HOST"] == "0.0.0.0", name
        assert "ports" not in svc, name  # two watcher replicas could not publish one host port
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name
        assert f"urlopen('http://127.0.0.1:{port}/readyz'" in test[3], name
    ports["gateway"] = _probe_port("gateway", _environment(tickstream["gateway"]))
    assert len(set(ports.values())) == len(ports), ports


def test_compose_watcher_is_live_unless_the_operator_chooses_synthetic(
    raw_compose: dict[str, Any],
) -> None:
    """The watcher runs the live source; WATCHER_SOURCE=synthetic in the shell overrides it."""
    default = _interpolate(raw_compose, {})["services"]["watcher"]
    synthetic = _interpolate(raw_compose, SYNTHETIC)["services"]["watcher"]
    assert _environment(default)["WATCHER_SOURCE"] == "live"
    assert _environment(synthetic)["WATCHER_SOURCE"] == "synthetic"


def test_compose_substitutions_read_the_variable_they_set(raw_compose: dict[str, Any]) -> None:
    """A `${VAR...}` in a tickstream service's environment reads the operator's VAR, no other."""
    for name, svc in raw_compose["services"].items():
        if _is_tickstream(svc):
            for key, value in _environment(svc).items():
                assert _substituted_names(value) <= {key}, (name, key)


def test_compose_environments_are_valid_settings(raw_compose: dict[str, Any]) -> None:
    """Each tickstream service's environment loads as settings, with and without the override."""
    for environ in ({}, SYNTHETIC):
        services = _interpolate(raw_compose, environ)["services"]
        for svc in services.values():
            if _is_tickstream(svc):
                ServiceSettings.from_env(_environment(svc))


def test_compose_runs_a_standby_watcher(tickstream: dict[str, dict[str, Any]]) -> None:
    """Two watcher instances (alike, so they share the lease in Redis) and one of the others."""
    assert {name: _replicas(svc) for name, svc in tickstream.items()} == INSTANCES


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def _dockerfile_args(keyword: str) -> list[str]:
    return [args for kw, args in _dockerfile() if kw == keyword]


def test_dockerfile_entrypoint_is_the_console_script(cli_commands: frozenset[str]) -> None:
    """The image runs the `tickstream` console script, by default a real subcommand."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tickstream"] == "tickstream_shared.cli:main"
    assert [json.loads(a) for a in _dockerfile_args("ENTRYPOINT")] == [["tickstream"]]
    [cmd] = [json.loads(a) for a in _dockerfile_args("CMD")]
    assert cmd[0] in cli_commands


def test_dockerfile_copies_existing_paths_not_ignored() -> None:
    """Everything the Dockerfile COPYs exists in the repo and is not in .dockerignore."""
    ignored = [
        p.strip().rstrip("/")
        for p in DOCKERIGNORE.read_text().splitlines()
        if p.strip() and not p.strip().startswith(("#", "!"))
    ]
    copies = _dockerfile_args("COPY")
    assert copies
    for args in copies:
        words = json.loads(args) if args.startswith("[") else shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue  # copies from another build stage, not from the repo
        sources = [w for w in words if not w.startswith("--")][:-1]
        for source in sources:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), source
            assert [p for p in ignored if fnmatch.fnmatch(path, p)] == [], source


def test_dockerfile_runs_as_non_root_and_exposes_gateway_port() -> None:
    """The image drops root and exposes the gateway's default port."""
    [user] = _dockerfile_args("USER")
    assert user.split(":")[0] not in {"root", "0"}
    assert _dockerfile_args("EXPOSE") == [str(DEFAULTS["GATEWAY_PORT"])]
    assert _dockerfile_args("FROM") == ["python:3.11-slim"]


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(K8S.read_text()) if doc]


def _k8s_workloads(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(kind, container) for every container of every Deployment and Job."""
    return [
        (doc["kind"], container)
        for doc in docs
        if doc["kind"] in {"Deployment", "Job"}
        for container in doc["spec"]["template"]["spec"]["containers"]
    ]


def _k8s_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """Environment of a container: referenced ConfigMaps/Secrets in order, then its own `env`."""
    sources = {
        (doc["kind"], doc["metadata"]["name"]): {
            **doc.get("data", {}),
            **doc.get("stringData", {}),
        }
        for doc in docs
        if doc["kind"] in {"ConfigMap", "Secret"}
    }
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            env |= sources[("ConfigMap", ref["configMapRef"]["name"])]
        else:
            env |= sources[("Secret", ref["secretRef"]["name"])]
    env |= {item["name"]: item.get("value", "") for item in container.get("env", [])}
    return env


def _k8s_env_names(docs: list[dict[str, Any]], container: dict[str, Any]) -> set[str]:
    return set(_k8s_env(docs, container))


def _k8s_deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Deployments by the subcommand their one container runs."""
    result = {}
    for doc in docs:
        if doc["kind"] == "Deployment":
            [container] = doc["spec"]["template"]["spec"]["containers"]
            result[container["args"][0]] = doc
    return result


def _with_config(docs: list[dict[str, Any]], key: str, value: str) -> list[dict[str, Any]]:
    """The manifest with `key` set to `value` in every ConfigMap that has it."""
    return [
        {**doc, "data": {**doc["data"], key: value}}
        if doc["kind"] == "ConfigMap" and key in doc.get("data", {})
        else doc
        for doc in docs
    ]


def test_k8s_containers_use_real_settings_and_commands(
    k8s: list[dict[str, Any]], cli_commands: frozenset[str]
) -> None:
    """Every container's args[0] is a CLI subcommand and every variable it gets is a setting."""
    workloads = _k8s_workloads(k8s)
    assert workloads
    for _, container in workloads:
        assert container["image"] == IMAGE
        assert container["args"][0] in cli_commands, container["name"]
        assert _k8s_env_names(k8s, container) - SETTINGS == set(), container["name"]


def test_k8s_runs_each_service_and_init_once(k8s: list[dict[str, Any]]) -> None:
    """One Deployment per service, init as a Job, each with what it needs to reach its infra."""
    kinds = sorted((container["args"][0], kind) for kind, container in _k8s_workloads(k8s))
    assert kinds == sorted((name, "Job" if name == "init" else "Deployment") for name in NEEDS)
    for _, container in _k8s_workloads(k8s):
        name = container["args"][0]
        assert NEEDS[name] - _k8s_env_names(k8s, container) == set(), name


def test_k8s_gateway_service_and_probes(k8s: list[dict[str, Any]]) -> None:
    """The gateway Service reaches the gateway pods on their port; probes hit it there."""
    [deployment] = [
        doc
        for doc in k8s
        if doc["kind"] == "Deployment"
        and doc["spec"]["template"]["spec"]["containers"][0]["args"] == ["gateway"]
    ]
    [service] = [doc for doc in k8s if doc["kind"] == "Service"]
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    port = int(env.get("GATEWAY_PORT", DEFAULTS["GATEWAY_PORT"]))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [service_port] = service["spec"]["ports"]
    assert service_port["port"] == port
    assert ports[service_port["targetPort"]] == port
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        assert ports[http["port"]] == port, probe


def test_k8s_every_service_is_probed_and_scraped_where_it_serves(
    k8s: list[dict[str, Any]],
) -> None:
    """Probes and prometheus.io annotations of each Deployment name the port its settings serve."""
    for name, deployment in _k8s_deployments(k8s).items():
        pod = deployment["spec"]["template"]
        [container] = pod["spec"]["containers"]
        env = _k8s_env(k8s, container)
        port = _probe_port(name, env)
        assert port != 0, name
        if name != "gateway":
            assert env["METRICS_HOST"] == "0.0.0.0", name
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
            http = container[probe]["httpGet"]
            assert (http["path"], ports[http["port"]]) == (path, port), (name, probe)
        timeout_ms = int(env.get("READINESS_TIMEOUT_MS", DEFAULTS["READINESS_TIMEOUT_MS"]))
        assert container["readinessProbe"]["timeoutSeconds"] * 1000 > timeout_ms, name
        annotations = pod["metadata"]["annotations"]
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }, name


def test_k8s_service_links_do_not_shadow_settings(k8s: list[dict[str, Any]]) -> None:
    """No Service name makes Kubernetes inject a variable that is also a tickstream setting."""
    for doc in k8s:
        if doc["kind"] == "Service":
            prefix = doc["metadata"]["name"].upper().replace("-", "_")
            injected = {f"{prefix}_PORT", f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT"}
            assert injected & SETTINGS == set(), doc["metadata"]["name"]


def test_k8s_environments_are_valid_settings(k8s: list[dict[str, Any]]) -> None:
    """Each container's environment, from ConfigMaps, Secret and `env`, loads as settings."""
    for _, container in _k8s_workloads(k8s):
        ServiceSettings.from_env(_k8s_env(k8s, container))


def test_k8s_watcher_is_live_unless_its_configmap_says_synthetic(
    k8s: list[dict[str, Any]],
) -> None:
    """The watcher runs the live source, and setting the ConfigMap value switches it."""
    [watcher] = _k8s_deployments(k8s)["watcher"]["spec"]["template"]["spec"]["containers"]
    assert _k8s_env(k8s, watcher)["WATCHER_SOURCE"] == "live"
    switched = _with_config(k8s, "WATCHER_SOURCE", SYNTHETIC["WATCHER_SOURCE"])
    assert _k8s_env(switched, watcher)["WATCHER_SOURCE"] == "synthetic"


def test_k8s_runs_a_standby_watcher(k8s: list[dict[str, Any]]) -> None:
    """Two watcher replicas, never both stopped by a rollout; one of stats and alerts."""
    deployments = _k8s_deployments(k8s)
    replicas = {name: doc["spec"].get("replicas") for name, doc in deployments.items()}
    # The gateway's replicas are the autoscaler's (test_k8s_gateway_scales_out_on_cpu).
    assert replicas == {
        **{name: n for name, n in INSTANCES.items() if name not in {"init", "gateway"}},
        "gateway": None,
    }
    strategy = deployments["watcher"]["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_k8s_gateway_scales_out_on_cpu(k8s: list[dict[str, Any]]) -> None:
    """One autoscaling/v2 HPA scales the gateway Deployment (and nothing else) on CPU."""
    [hpa] = [doc for doc in k8s if doc["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    gateway = _k8s_deployments(k8s)["gateway"]
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": gateway["apiVersion"],
        "kind": "Deployment",
        "name": gateway["metadata"]["name"],
    }
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    [metric] = spec["metrics"]
    assert (metric["type"], metric["resource"]["name"]) == ("Resource", "cpu")
    target = metric["resource"]["target"]
    assert target["type"] == "Utilization" and 0 < target["averageUtilization"] <= 100
    # A fixed replica count would undo the autoscaler's choice at every `kubectl apply`.
    assert "replicas" not in gateway["spec"]
    # Utilisation is relative to the request: without one the HPA has nothing to compute.
    [container] = gateway["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"]


async def test_k8s_gateway_liveness_ignores_dependencies_and_readiness_does_not(
    k8s: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With broker, Redis and PostgreSQL all away, the gateway's liveness path answers 200
    (no restart) and its readiness path 503 naming each (out of the Service)."""

    class RedisAway:
        async def ping(self) -> bool:
            raise ConnectionError("Redis is away")

    class DatabaseAway:
        def acquire(self) -> Any:
            raise OSError("PostgreSQL is away")

    async def broker_away(settings: ServiceSettings) -> None:
        raise OSError("the broker is away")

    monkeypatch.setattr(health, "check_broker", broker_away)
    settings = ServiceSettings()
    state = GatewayState(
        settings,
        RedisAway(),  # type: ignore[arg-type]
        DatabaseAway(),
        Hub(10),
        MarketHistory(RecentBars(max_bars=10), _no_history),
        asyncio.Event(),
    )
    state.feed_ready.set()  # the feed retries inside the process: only the servers are away
    endpoints = {r.path: r.endpoint for r in create_app(settings).routes if isinstance(r, Route)}
    [container] = _k8s_deployments(k8s)["gateway"]["spec"]["template"]["spec"]["containers"]

    async def answer(probe: str) -> tuple[int, Any]:
        path = container[probe]["httpGet"]["path"]
        scope = {"type": "http", "method": "GET", "path": path, "headers": [], "state": {}}
        scope["state"]["gateway"] = state
        response = await endpoints[path](Request(scope))
        return response.status_code, json.loads(response.body)

    assert await answer("livenessProbe") == (200, {"status": "ok"})
    assert await answer("readinessProbe") == (
        503,
        {
            "status": "unhealthy",
            "broker": "error: OSError('the broker is away')",
            "redis": "error: ConnectionError('Redis is away')",
            "database": "error: OSError('PostgreSQL is away')",
            "feed": "ok",
        },
    )


async def _no_history(market_id: str) -> list[Any]:
    """A history read these tests never make."""
    raise AssertionError("no history read expected")


# --- deploy/k8s: schemas, resources, disruption budgets, network policies, Pod Security -----

# The oldest Kubernetes the manifest is written for (policy/v1 budgets with
# unhealthyPodEvictionPolicy, autoscaling/v2) and the newest schemas kubernetes-validate has.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Ports of the exchanges' default endpoints, which the watcher's egress must allow.
EXCHANGE_URLS = {env: DEFAULTS[env] for env in SETTINGS if env.endswith(("_WS_URL", "_REST_URL"))}
# Volume types the restricted Pod Security profile allows.
RESTRICTED_VOLUMES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
     "projected", "secret"}
)  # fmt: skip
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti)?$")
_SCALE = {None: 1.0, "m": 1e-3, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity (`100m`, `1`, `256Mi`) as a number of cores or bytes."""
    match = _QUANTITY.match(str(value))
    assert match is not None, f"quantity this test cannot read: {value!r}"
    return float(match[1]) * _SCALE[match[2]]


def _pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod templates of every Deployment and Job, by the workload's name."""
    return {
        doc["metadata"]["name"]: doc["spec"]["template"]
        for doc in docs
        if doc["kind"] in {"Deployment", "Job"}
    }


def _all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchExpressions: this test cannot read them"
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifest_is_valid_against_the_kubernetes_schemas(
    k8s: list[dict[str, Any]], version: str
) -> None:
    """Every resource validates, strictly (no unknown field), against Kubernetes' schemas."""
    for doc in k8s:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {exc.message}")


def test_k8s_pods_meet_the_restricted_pod_security_profile(k8s: list[dict[str, Any]]) -> None:
    """Every container runs as non-root, without escalation or capabilities, under the
    runtime's seccomp profile, on a read-only root filesystem; pods share nothing of the host."""
    pods = _pods(k8s)
    assert set(pods) == {f"tickstream-{name}" for name in NEEDS}
    for name, pod in pods.items():
        spec = pod["spec"]
        pod_context = spec.get("securityContext", {})
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host, False), (name, host)
        assert spec.get("automountServiceAccountToken") is False, name
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, (name, volume)
        for container in _all_containers(pod):
            context = container.get("securityContext", {})

            where = (name, container["name"])
            # A container's own setting wins over its pod's.
            effective = {**pod_context, **context}
            assert effective.get("runAsNonRoot") is True, where
            assert effective.get("runAsUser") not in {0, None}, where
            assert effective.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("privileged", False) is False, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("capabilities") == {"drop": ["ALL"]}, where
            assert "ports" not in container or all(
                "hostPort" not in port for port in container["ports"]
            ), where


def test_k8s_run_as_the_images_user(k8s: list[dict[str, Any]]) -> None:
    """Pods run as the numeric user and group deploy/Dockerfile creates and switches to."""
    [user] = _dockerfile_args("USER")
    uid, gid = (int(part) for part in user.split(":"))
    for name, pod in _pods(k8s).items():
        context = pod["spec"]["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid), name


def test_k8s_writable_paths_are_bounded_empty_dirs(k8s: list[dict[str, Any]]) -> None:
    """What a container may write (/tmp) is a size-bounded emptyDir of its own pod."""
    for name, pod in _pods(k8s).items():
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for container in _all_containers(pod):
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, (name, container["name"])
            for path, volume in mounts.items():
                empty_dir = volumes[volume]["emptyDir"]
                assert _quantity(empty_dir["sizeLimit"]) > 0, (name, path)


def test_k8s_every_container_has_requests_within_limits(k8s: list[dict[str, Any]]) -> None:
    """Each container requests CPU and memory and is limited to no less than it requests."""
    for name, pod in _pods(k8s).items():
        for container in _all_containers(pod):
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                request = _quantity(resources["requests"][resource])
                limit = _quantity(resources["limits"][resource])
                assert 0 < request <= limit, (name, container["name"], resource)
            # One event loop per process: a limit below one core only throttles it.
            assert _quantity(resources["limits"]["cpu"]) >= 0.5, name


def test_k8s_every_deployment_container_has_both_probes(k8s: list[dict[str, Any]]) -> None:
    """Every long-running container has a liveness and a readiness probe (the Job needs none)."""
    for name, deployment in _k8s_deployments(k8s).items():
        for container in _all_containers(deployment["spec"]["template"]):
            assert {"livenessProbe", "readinessProbe"} <= set(container), (name, container["name"])


def test_k8s_every_deployment_has_a_budget_that_lets_a_drain_through(
    k8s: list[dict[str, Any]],
) -> None:
    """One PodDisruptionBudget per Deployment; none forbids evicting a pod, and those of the
    replicated watcher and gateway keep one serving."""
    budgets = _of_kind(k8s, "PodDisruptionBudget")
    [hpa] = _of_kind(k8s, "HorizontalPodAutoscaler")
    for name, deployment in _k8s_deployments(k8s).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        [budget] = [b for b in budgets if _selects(b["spec"]["selector"], labels)]
        spec = budget["spec"]
        replicas = deployment["spec"].get("replicas", hpa["spec"]["minReplicas"])
        if replicas > 1:
            assert spec == {**spec, "minAvailable": 1}, name
        else:
            assert spec.get("maxUnavailable") == 1, name
        assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow", name
    assert len(budgets) == len(_k8s_deployments(k8s))


def _namespace_and_port(address: str) -> tuple[str, int]:
    """(namespace, port) of `host:port` or a URL naming a `<service>.<namespace>.svc` host."""
    url = urlsplit(address if "://" in address else f"tcp://{address}")
    assert url.hostname is not None and url.port is not None, address
    labels = url.hostname.split(".")
    assert labels[2] == "svc", f"not a cluster service address: {address}"
    return labels[1], url.port


def _egress(docs: list[dict[str, Any]], labels: dict[str, str]) -> set[tuple[str, str, int]]:
    """(peer, protocol, port) the policies that select a pod allow out; peer is a namespace,
    `internet`, or `any`."""
    allowed = set()
    for policy in _of_kind(docs, "NetworkPolicy"):
        if not _selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("egress", []):
            peers = []
            for peer in rule.get("to", [{}]):
                if "ipBlock" in peer:
                    peers.append("internet")
                elif "namespaceSelector" in peer:
                    peers.append(peer["namespaceSelector"]["matchLabels"][NAMESPACE_LABEL])
                else:
                    peers.append("any")
            for port in rule["ports"]:
                allowed |= {(p, port["protocol"], port["port"]) for p in peers}
    return allowed


NAMESPACE_LABEL = "kubernetes.io/metadata.name"
DNS = {("kube-system", "UDP", 53), ("kube-system", "TCP", 53)}


def test_k8s_default_deny_covers_every_pod(k8s: list[dict[str, Any]]) -> None:
    """One policy with no rules selects every tickstream pod for ingress and egress."""
    denials = [
        p
        for p in _of_kind(k8s, "NetworkPolicy")
        if "ingress" not in p["spec"] and "egress" not in p["spec"]
    ]
    [deny] = denials
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for name, pod in _pods(k8s).items():
        assert _selects(deny["spec"]["podSelector"], pod["metadata"]["labels"]), name


def test_k8s_egress_is_exactly_what_each_process_talks_to(k8s: list[dict[str, Any]]) -> None:
    """Each pod may reach DNS, the Kafka, Redis and PostgreSQL its environment names, and (the
    watcher only) the exchanges' default endpoints on the internet; nothing else."""
    exchange_ports = {
        urlsplit(url).port or 443 for url in EXCHANGE_URLS.values() if isinstance(url, str)
    }
    assert exchange_ports == {443, 9443, 8443}
    for name, pod in _pods(k8s).items():
        [container] = pod["spec"]["containers"]
        service = container["args"][0]
        env = _k8s_env(k8s, container)
        expected = set(DNS)
        for variable in sorted(NEEDS[service]):
            namespace, port = _namespace_and_port(env[variable])
            expected.add((namespace, "TCP", port))
        if service == "watcher":
            expected |= {("internet", "TCP", port) for port in exchange_ports}
        assert _egress(k8s, pod["metadata"]["labels"]) == expected, name


def test_k8s_watcher_internet_egress_excludes_private_ranges(k8s: list[dict[str, Any]]) -> None:
    """The watcher's internet egress leaves out the private and link-local ranges."""
    [policy] = [
        p for p in _of_kind(k8s, "NetworkPolicy") if p["metadata"]["name"] == "tickstream-watcher"
    ]
    blocks = [
        peer["ipBlock"]
        for rule in policy["spec"]["egress"]
        for peer in rule["to"]
        if "ipBlock" in peer
    ]
    assert {b["cidr"] for b in blocks} == {"0.0.0.0/0", "::/0"}
    [v4] = [b for b in blocks if b["cidr"] == "0.0.0.0/0"]
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(v4["except"])


def test_k8s_ingress_opens_only_the_port_each_service_serves(k8s: list[dict[str, Any]]) -> None:
    """Only the port a Deployment serves /metrics and probes on is open, the gateway's to all,
    the others' to the monitoring namespace; the Job takes nothing in."""
    for name, pod in _pods(k8s).items():
        [container] = pod["spec"]["containers"]
        service = container["args"][0]
        rules = [
            rule
            for policy in _of_kind(k8s, "NetworkPolicy")
            if _selects(policy["spec"]["podSelector"], pod["metadata"]["labels"])
            for rule in policy["spec"].get("ingress", [])
        ]
        if service == "init":
            assert rules == [], name
            continue
        port = _probe_port(service, _k8s_env(k8s, container))
        [rule] = rules
        assert rule["ports"] == [{"protocol": "TCP", "port": port}], name
        if service == "gateway":
            assert "from" not in rule
        else:
            assert rule["from"] == [
                {"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: "monitoring"}}}
            ], name
