"""deploy/grafana and deploy/prometheus checked against the metrics the code really exports."""

from __future__ import annotations

import gc
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from tickstream_shared.observability import Family

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "tickstream.json"
RULES = ROOT / "deploy" / "prometheus" / "tickstream-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tickstream-rules.test.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
PACKAGES = (
    "tickstream_shared",
    "tickstream_watcher",
    "tickstream_stats",
    "tickstream_alerts",
    "tickstream_gateway",
)
# Labels Prometheus gives every scraped series, and names it makes itself.
TARGET_LABELS = frozenset({"job", "instance"})
PROMETHEUS_OWN = {"up": frozenset[str](), "scrape_duration_seconds": frozenset[str]()}
# What Grafana puts in a query before it reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$exchange": ".*"}

# Sample names per metric type, from the family's name (prometheus_client's text format).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def _samples_of(name: str, kind: str, labels: frozenset[str]) -> dict[str, frozenset[str]]:
    base = name.removesuffix("_total") if kind == "counter" else name
    result = {}
    for suffix in _SUFFIXES.get(kind, ("",)):
        extra = {"le"} if suffix == "_bucket" else {"quantile"} if kind == "summary" else set()
        result[base + suffix] = labels | extra
    return result


def _import_everything() -> None:
    """Import every module of the five packages, so that every metric family is defined."""
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, f"{package}."):
            if not info.name.endswith("__main__"):  # runs the service
                importlib.import_module(info.name)


@pytest.fixture(scope="module")
def exported() -> dict[str, frozenset[str]]:
    """Every sample name a tickstream process can export, with its label names.

    From the objects that define them: our `Family` values (read from the objects that keep
    the counts, so they show in a scrape only once tracked), prometheus_client's metrics, and
    the collectors of the default registry (process and Python runtime metrics).
    """
    _import_everything()
    names: dict[str, frozenset[str]] = dict(PROMETHEUS_OWN)

    def add(samples: dict[str, frozenset[str]]) -> None:
        for name, labels in samples.items():
            names[name] = names.get(name, frozenset()) | labels

    for obj in gc.get_objects():
        if isinstance(obj, Family):
            add(_samples_of(obj.name, obj.kind, frozenset(obj.labels)))
        elif isinstance(obj, MetricWrapperBase):
            add(_samples_of(obj._name, obj._type or "", frozenset(obj._labelnames)))
    for family in REGISTRY.collect():
        add(_samples_of(family.name, family.type, frozenset()))
        add({sample.name: frozenset(sample.labels) for sample in family.samples})
    return names


# --- PromQL: the metric names, matcher labels and grouping labels of an expression ---------

_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "start", "end"}
)
_CLAUSES = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<number>\d[\w.]*)
    |(?P<ident>[A-Za-z_:][\w:]*)
    |(?P<brace>\{)
    |(?P<bracket>\[[^\]]*\])
    |(?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)
_AGGREGATION_CLAUSE = re.compile(r"(by|without)\s*\(")
_MATCHER = re.compile(r"\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*(\"(?:[^\"\\]|\\.)*\")\s*,?")


class Query:
    """What one PromQL expression refers to: metric names, labels matched and grouped by."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.metrics: set[str] = set()
        self.matched: set[tuple[str, str]] = set()  # (metric, label)
        self.grouped: set[str] = set()
        self._parse(expr)

    def _parse(self, expr: str) -> None:
        position, previous = 0, ""
        while position < len(expr):
            match = _TOKEN.match(expr, position)
            assert match is not None
            position = match.end()
            kind, text = match.lastgroup, match.group()
            if kind == "ident":
                following = expr[position:].lstrip()
                if text in _CLAUSES and following.startswith("("):
                    close = following.index(")")
                    labels = following[1:close].split(",")
                    self.grouped |= {label.strip() for label in labels if label.strip()}
                    position = len(expr) - len(following) + close + 1
                elif (
                    following.startswith("(")
                    or _AGGREGATION_CLAUSE.match(following)
                    or text in _KEYWORDS
                ):
                    pass  # a function or an aggregation (`sum by (x) (...)`), or an operator
                else:
                    self.metrics.add(text)
                previous = text
            elif kind == "brace":
                close = expr.index("}", position)
                body = expr[position:close]
                matchers = _MATCHER.findall(body)
                assert (
                    "".join(m.group() for m in _MATCHER.finditer(body)).strip() == body.strip()
                ), f"matchers this test cannot read: {body!r}"
                owner = previous if previous in self.metrics else ""
                self.matched |= {(owner, label) for label, _, _ in matchers}
                position = close + 1
            elif kind != "other" or not text.isspace():
                previous = text


def _grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr!r}"
    return expr


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in _dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, PromQL with Grafana's variables filled in, legend) of every target."""
    return [
        (panel["title"], _grafana_to_promql(target["expr"]), target.get("legendFormat", ""))
        for panel in _dashboard_panels()
        for target in panel.get("targets", [])
    ]


def rule_queries() -> list[tuple[str, str]]:
    """(alert or record name, PromQL) of every rule."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]


def _check_query(where: str, expr: str, exported: dict[str, frozenset[str]]) -> Query:
    query = Query(expr)
    unknown = sorted(query.metrics - set(exported))
    assert unknown == [], f"{where}: no such metric {unknown} in {expr!r}"
    available = set(TARGET_LABELS).union(*(exported[m] for m in query.metrics))
    for metric, label in sorted(query.matched):
        labels = exported[metric] | TARGET_LABELS if metric else available
        assert label in labels, f"{where}: {metric or 'selector'} has no label {label!r}"
    missing = sorted(query.grouped - available)
    assert missing == [], f"{where}: grouped by labels no metric has: {missing}"
    return query


def test_the_parser_sees_names_labels_and_groupings() -> None:
    """The PromQL reader finds metric names, matcher labels and grouping labels, nothing else."""
    query = Query(
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{x="1", y=~"b|c"}[5m])))'
        " / on (job) group_left (service) info_metric > 1e-9 and b offset 1h"
    )
    assert query.metrics == {"a_bucket", "info_metric", "b"}
    assert query.matched == {("a_bucket", "x"), ("a_bucket", "y")}
    assert query.grouped == {"job", "le", "service"}


def test_exported_names_include_every_family_kind(exported: dict[str, frozenset[str]]) -> None:
    """The catalogue has our families, prometheus_client's metrics and the process metrics."""
    assert exported["tickstream_consumer_lag_records"] == {"topic", "partition"}
    assert exported["tickstream_live_corrected_total"] == {"exchange"}
    assert exported["tickstream_http_requests_total"] == {"route", "status"}
    assert exported["tickstream_batch_duration_seconds_bucket"] == {"le"}
    assert "process_cpu_seconds_total" in exported


def test_a_real_scrape_exports_nothing_the_catalogue_misses(
    exported: dict[str, frozenset[str]],
) -> None:
    """Every sample of this process's /metrics body is in the catalogue, labels included."""
    body = generate_latest(REGISTRY).decode()
    samples = [s for f in text_string_to_metric_families(body) for s in f.samples]
    assert samples
    for sample in samples:
        assert set(sample.labels) <= exported[sample.name], sample


def test_dashboard_queries_name_exported_metrics_and_labels(
    exported: dict[str, frozenset[str]],
) -> None:
    """Every dashboard query names metrics and labels the services export; legends too."""
    queries = dashboard_queries()
    assert len(queries) >= 40
    for title, expr, legend in queries:
        query = _check_query(f"panel {title!r}", expr, exported)
        available = set(TARGET_LABELS).union(*(exported[m] for m in query.metrics))
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        assert shown <= available, f"panel {title!r}: legend {legend!r}"


def test_dashboard_variables_query_exported_labels(exported: dict[str, frozenset[str]]) -> None:
    """The dashboard's label_values() variables read a label their metric has."""
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
        assert found is not None, variable["definition"]
        assert found[2] in exported[found[1]], variable["name"]


def test_dashboard_shows_every_tickstream_metric(exported: dict[str, frozenset[str]]) -> None:
    """Each tickstream metric is on the dashboard: a new one needs a panel (or a place in one)."""
    families = {
        name.removesuffix("_bucket")
        for name in exported
        if name.startswith("tickstream_") and not name.endswith(("_created", "_count", "_sum"))
    }
    shown = {
        name.removesuffix("_bucket")
        for _, expr, _ in dashboard_queries()
        for name in Query(expr).metrics
    }
    assert families - shown == set()


def test_dashboard_panels_are_distinct_and_use_the_datasource_variable() -> None:
    """Panel ids are unique, panels do not overlap, and every query uses ${datasource}."""
    panels = list(_dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert cells & area == set(), f"{panel['title']!r} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_rules_name_exported_metrics_and_labels(exported: dict[str, frozenset[str]]) -> None:
    """Every alert rule's expression names metrics and labels the services export."""
    queries = rule_queries()
    assert len(queries) >= 15
    for name, expr in queries:
        _check_query(f"rule {name}", expr, exported)


def test_rules_cover_what_operations_asks_for() -> None:
    """Lag, feeds stale or unreachable, dead letters, corrections and gateway saturation."""
    alerts = {name for name, _ in rule_queries()}
    assert {
        "TickstreamConsumerLagGrowing",
        "TickstreamExchangeUnreachable",
        "TickstreamFeedNotLive",
        "TickstreamDeadLetters",
        "TickstreamCorrectionsSpiking",
        "TickstreamGatewayCpuSaturated",
        "TickstreamGatewayRefusingConnections",
    } <= alerts


def test_operations_doc_lists_exactly_the_exported_tickstream_metrics(
    exported: dict[str, frozenset[str]],
) -> None:
    """docs/operations.md's metrics table names each tickstream metric, and no other."""
    documented = set(re.findall(r"^\| `(tickstream_\w+)` \|", OPERATIONS.read_text(), re.M))
    families = {
        name.removesuffix("_bucket")
        for name in exported
        if name.startswith("tickstream_") and not name.endswith(("_created", "_count", "_sum"))
    }
    assert documented == families


def _promtool() -> str:
    """promtool from the virtualenv (make test puts it there) or PATH; skips if none.

    Under CI (CI=true) a missing promtool fails instead: the machine can install it.
    """
    beside = Path(sys.executable).parent / "promtool"
    found = str(beside) if beside.exists() else shutil.which("promtool")
    if found is None:
        reason = "promtool not found: `make test` fetches it (deploy/prometheus/get-promtool.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_checks_the_rules() -> None:
    """`promtool check rules` accepts deploy/prometheus/tickstream-rules.yaml."""
    result = _run(_promtool(), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_queries())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """`promtool test rules` passes the alert unit tests of tickstream-rules.test.yaml."""
    result = _run(_promtool(), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each dashboard query, Grafana's variables filled in, is valid PromQL to promtool."""
    rules = [
        {"record": f"tickstream:dashboard_query_{i}", "expr": expr}
        for i, (_, expr, _) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(_promtool(), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
