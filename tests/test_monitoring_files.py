"""The shipped Prometheus and Grafana files (docker/monitoring/) only use metrics the app exports.

The exported names and labels are read from the source (leasesite/metrics.py and
leasesite/upstream_metrics.py), not from a list kept here, so renaming a metric or a label there
fails these tests until the alerts and the dashboard follow.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "docker" / "monitoring"
PROMETHEUS_FILE = MONITORING / "prometheus.yml"
ALERTS_FILE = MONITORING / "alerts.yml"
DASHBOARD_FILE = MONITORING / "grafana-dashboard.json"
METRIC_SOURCES = (ROOT / "leasesite" / "metrics.py", ROOT / "leasesite" / "upstream_metrics.py")

# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
SEVERITIES = {"warning", "critical"}
PANEL_TYPES = {"timeseries", "stat", "gauge"}
HAN = re.compile(r"[\u4e00-\u9fff]")

# --- what the app exports, read from the source ------------------------------------------------

METRIC_CLASSES = {"GaugeMetricFamily": "gauge", "Counter": "counter", "Histogram": "histogram"}
# Where the label names are: keyword name, else the position of the argument.
LABEL_ARGUMENTS = {"gauge": ("labels", 2), "counter": ("labelnames", 2), "histogram": ("labelnames", 2)}


def _call_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _argument(node: ast.Call, keyword: str, position: int) -> ast.expr | None:
    for item in node.keywords:
        if item.arg == keyword:
            return item.value
    return node.args[position] if len(node.args) > position else None


def _enum_value(tree: ast.AST, enum: str, member: str) -> str:
    """The value of ``enum.member`` (a TextChoices member), read from the module the source imports it from."""
    modules = [
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and any(alias.name == enum for alias in node.names)
    ]
    assert modules, f"the source does not import {enum}"
    module = ast.parse((ROOT / Path(*modules[0].split("."))).with_suffix(".py").read_text(encoding="utf-8"))
    for node in ast.walk(module):
        if not (isinstance(node, ast.ClassDef) and node.name == enum):
            continue
        for statement in node.body:
            if isinstance(statement, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == member for target in statement.targets
            ):
                value = statement.value.elts[0] if isinstance(statement.value, ast.Tuple) else statement.value
                assert isinstance(value, ast.Constant) and isinstance(value.value, str), ast.dump(statement)
                return value.value
    raise AssertionError(f"{enum}.{member} not found in {modules[0]}")


def _loop_values(tree: ast.AST, variable: str) -> list[str]:
    """The values a ``for variable in (A, B)`` loop of the source gives ``variable``.

    Members of a TextChoices enum (``RunKind.REFRESH``) resolve to their value."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == variable):
            continue
        assert isinstance(node.iter, ast.Tuple | ast.List), f"loop over {variable} is not a literal tuple"
        values = []
        for element in node.iter.elts:
            if isinstance(element, ast.Constant) and isinstance(element.value, str):
                values.append(element.value)
            elif isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name):
                values.append(_enum_value(tree, element.value.id, element.attr))
            else:
                raise AssertionError(f"cannot read the loop over {variable}: {ast.dump(element)}")
        return values
    raise AssertionError(f"no loop gives {variable!r} its values")


def _names(node: ast.expr, tree: ast.AST) -> list[str]:
    """A metric name argument: a literal, or an f-string over a loop variable, expanded."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    assert isinstance(node, ast.JoinedStr), f"metric name is neither a literal nor an f-string: {ast.dump(node)}"
    names = [""]
    for part in node.values:
        if isinstance(part, ast.Constant):
            names = [name + part.value for name in names]
        else:
            assert isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name), ast.dump(part)
            names = [name + value for name in names for value in _loop_values(tree, part.value.id)]
    return names


def _labels(node: ast.expr | None) -> frozenset[str]:
    if node is None:
        return frozenset()
    assert isinstance(node, ast.List | ast.Tuple), f"labels are not a literal list: {ast.dump(node)}"
    labels = []
    for element in node.elts:
        assert isinstance(element, ast.Constant) and isinstance(element.value, str), ast.dump(element)
        labels.append(element.value)
    return frozenset(labels)


def metric_declarations(source: str) -> list[tuple[str, str, frozenset[str]]]:
    """(name, type, labels) of every GaugeMetricFamily/Counter/Histogram the source creates."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        kind = METRIC_CLASSES.get(_call_name(node) or "")
        if kind is None:
            continue
        name_node = _argument(node, "name", 0)
        assert name_node is not None, f"{kind} created without a name"
        labels = _labels(_argument(node, *LABEL_ARGUMENTS[kind]))
        found.extend((name, kind, labels) for name in _names(name_node, tree))
    return found


def exported_series(declarations: list[tuple[str, str, frozenset[str]]]) -> dict[str, frozenset[str]]:
    """Series name -> its label names, as /metrics shows them (counters get _total, histograms
    _bucket/_sum/_count). No _created: the multiprocess mode of production does not write it."""
    series: dict[str, frozenset[str]] = {}
    for name, kind, labels in declarations:
        if kind == "gauge":
            series[name] = labels
        elif kind == "counter":
            series[name.removesuffix("_total") + "_total"] = labels
        else:
            series[name + "_bucket"] = labels | {"le"}
            series[name + "_sum"] = labels
            series[name + "_count"] = labels
    return series


@cache
def exported() -> dict[str, frozenset[str]]:
    declarations = []
    for path in METRIC_SOURCES:
        source = path.read_text(encoding="utf-8")
        found = metric_declarations(source)
        assert found, f"{path} declares no metric"
        # Every creation the plain text shows is one the syntax tree reading understood.
        text_calls = len(re.findall(rf"\b(?:{'|'.join(METRIC_CLASSES)})\(", source))
        tree_calls = sum(
            1
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and _call_name(node) in METRIC_CLASSES
        )
        assert text_calls == tree_calls, (path, text_calls, tree_calls)
        declarations.extend(found)
    return exported_series(declarations)


# --- PromQL ----------------------------------------------------------------------------------

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
SELECTOR = re.compile(r"(?<![\w:])(leasesite_[A-Za-z0-9_:]*)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
TEMPLATE_LABEL = re.compile(r"\$labels\.(\w+)|\{\{\s*(\w+)\s*\}\}")


def promql_metrics(expr: str) -> list[str]:
    """The leasesite_ metric names an expression selects (label values do not count)."""
    return [match.group(1) for match in SELECTOR.finditer(STRING.sub('""', expr))]


def promql_problems(expr: str, series: dict[str, frozenset[str]], templates: str = "") -> list[str]:
    """What is wrong with ``expr`` against the exported ``series``: unknown metric names, label
    matchers a metric does not have, grouping labels no selected metric has, and label
    references in ``templates`` (annotations or a legend) that no selected metric has."""
    code = STRING.sub('""', expr)
    problems = []
    if "__name__" in code:
        problems.append("selects by __name__: the metric names cannot be checked")
    selected: set[str] = set()
    for match in SELECTOR.finditer(code):
        name, matchers = match.group(1), match.group(2) or ""
        if name not in series:
            problems.append(f"unknown metric {name}")
            continue
        selected.add(name)
        for label in MATCHER.findall(matchers):
            if label not in series[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r} (it has {sorted(series[name])})")
    if not selected and not any(name.startswith("unknown") for name in problems):
        problems.append("selects no leasesite_ metric")
    known = frozenset().union(*(series[name] for name in selected)) | TARGET_LABELS
    for group in GROUPING.findall(code):
        for label in (item.strip() for item in group.split(",")):
            if label and label not in known:
                problems.append(f"groups by {label!r}, which none of {sorted(selected)} has")
    for dollar, braces in TEMPLATE_LABEL.findall(templates):
        label = dollar or braces
        if label not in known:
            problems.append(f"refers to label {label!r}, which none of {sorted(selected)} has")
    return problems


# --- the files -------------------------------------------------------------------------------


def load_alert_rules() -> list[dict]:
    document = yaml.safe_load(ALERTS_FILE.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def dashboard_targets() -> list[tuple[str, dict]]:
    return [(panel["title"], target) for panel in load_dashboard()["panels"] for target in panel["targets"]]


def test_the_source_declares_metrics_with_labels():
    series = exported()
    # Each source file contributes, the f-string names expand, and labels are read.
    assert any(name.endswith("_total") for name in series)
    assert any(name.endswith("_bucket") for name in series)
    assert not any("{" in name for name in series)
    assert all(name.startswith("leasesite_") for name in series)
    assert any(labels - {"le"} for labels in series.values())


def test_alert_rules_parse_and_are_complete():
    document = yaml.safe_load(ALERTS_FILE.read_text(encoding="utf-8"))
    assert document["groups"], "no rule groups"
    names = [group["name"] for group in document["groups"]]
    assert len(names) == len(set(names)), names
    rules = load_alert_rules()
    assert rules
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule.get("alert"), rule
        assert str(rule.get("expr", "")).strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smhd]", str(rule.get("for", ""))), rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
        annotations = rule.get("annotations", {})
        for key in ("summary", "description"):
            assert HAN.search(annotations.get(key, "")), f"{rule['alert']}: {key} is not written in Chinese"


def test_alert_rules_cover_the_documented_problems():
    alerts = {rule["alert"] for rule in load_alert_rules()}
    for name in (
        "LeasesiteHeartbeatStale",
        "LeasesiteJobStale",
        "LeasesiteRefreshRunFailed",
        "LeasesiteRefreshStale",
        "LeasesiteFailedLeases",
        "LeasesiteOverdueLeases",
        "LeasesiteTeamUnhealthy",
        "LeasesiteTeamSyncStale",
        "LeasesiteTokensFailing",
        "LeasesiteUpstreamErrors",
        "LeasesiteUpstreamSlow",
    ):
        assert name in alerts


@pytest.mark.parametrize("rule", load_alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_expressions_use_exported_metrics_and_labels(rule):
    templates = " ".join(str(value) for value in rule["annotations"].values())
    assert promql_problems(rule["expr"], exported(), templates) == []


def test_dashboard_parses_and_panels_are_complete():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "leasesite"
    assert dashboard["title"] == "leasesite"
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {item["name"]: item for item in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert panels
    ids = [panel.get("id") for panel in panels]
    assert all(isinstance(item, int) for item in ids), ids
    assert len(ids) == len(set(ids)), ids
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel
        assert HAN.search(panel.get("title", "")), f"panel {panel['id']} has no Chinese title"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid.get(key), int) for key in ("x", "y", "w", "h")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], f"{panel['title']} has no target"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and "legendFormat" in target, panel["title"]


def test_dashboard_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]


@pytest.mark.parametrize(("title", "target"), dashboard_targets(), ids=lambda item: str(item))
def test_dashboard_expressions_use_exported_metrics_and_labels(title, target):
    assert promql_problems(target["expr"], exported(), target["legendFormat"]) == [], title


def test_prometheus_config_scrapes_metrics_with_a_bearer_token():
    config = yaml.safe_load(PROMETHEUS_FILE.read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["leasesite"]
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == "30s"
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"] == "/etc/prometheus/metrics_token"
    assert "credentials" not in job["authorization"], "the token belongs in the credentials file, not here"
    assert [target for static in job["static_configs"] for target in static["targets"]] == ["web:8000"]
    assert "alerts.yml" in config["rule_files"]
    for name in config["rule_files"]:
        assert (PROMETHEUS_FILE.parent / name).is_file(), name


def test_the_scraped_target_is_the_compose_web_service():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text(encoding="utf-8"))
    web = compose["services"]["web"]
    assert any(str(port).endswith(":8000") for port in web["ports"])


# --- the checker itself can fail ---------------------------------------------------------------


def test_checker_reports_an_unknown_metric():
    problems = promql_problems("sum(rate(leasesite_upstream_request_total[5m]))", exported())
    assert any("unknown metric leasesite_upstream_request_total" in problem for problem in problems), problems


def test_checker_reports_a_misspelled_metric_in_a_copy_of_an_alert():
    rule = next(rule for rule in load_alert_rules() if rule["alert"] == "LeasesiteFailedLeases")
    broken = rule["expr"].replace("leasesite_leases", "leasesite_lease")
    assert broken != rule["expr"]
    assert promql_problems(broken, exported()) == ["unknown metric leasesite_lease"]


def test_checker_reports_a_label_the_metric_does_not_have():
    problems = promql_problems('leasesite_leases{state="failed"} > 0', exported())
    assert len(problems) == 1 and "no label 'state'" in problems[0], problems
    problems = promql_problems('leasesite_baoming_tokens{team="x"}', exported())
    assert len(problems) == 1 and "no label 'team'" in problems[0], problems


def test_checker_reports_grouping_and_template_labels_no_metric_has():
    problems = promql_problems("sum by (pool) (leasesite_team_seats)", exported())
    assert len(problems) == 1 and "groups by 'pool'" in problems[0], problems
    problems = promql_problems("leasesite_leases_overdue > 0", exported(), "{{ $labels.team }}")
    assert len(problems) == 1 and "label 'team'" in problems[0], problems


def test_checker_ignores_label_values_and_requires_a_metric():
    # "leasesite_x" here is a label value, not a metric.
    assert promql_problems('leasesite_job_last_success_timestamp_seconds{task="leasesite_x"}', exported()) == []
    assert promql_problems("time() > 0", exported()) == ["selects no leasesite_ metric"]
    assert promql_problems('{__name__="leasesite_leases"}', exported())[0].startswith("selects by __name__")


def test_source_reader_expands_f_strings_and_suffixes():
    source = """
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
A = Counter("leasesite_calls", "help", ["who"], registry=None)
B = Histogram("leasesite_wait_seconds", "help", labelnames=["who"])
for kind in ("red", "blue"):
    C = GaugeMetricFamily(f"leasesite_{kind}_count", "help", labels=["size"])
"""
    assert exported_series(metric_declarations(source)) == {
        "leasesite_calls_total": {"who"},
        "leasesite_wait_seconds_bucket": {"who", "le"},
        "leasesite_wait_seconds_sum": {"who"},
        "leasesite_wait_seconds_count": {"who"},
        "leasesite_red_count": {"size"},
        "leasesite_blue_count": {"size"},
    }


# --- promtool, where installed -----------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package 'prometheus'); its checks are skipped"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False)


@needs_promtool
def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", str(ALERTS_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_the_dashboard_expressions(tmp_path):
    # Each dashboard query as a recording rule: promtool then parses it as PromQL.
    rules = [
        {"record": f"leasesite_dashboard:query_{index}", "expr": target["expr"]}
        for index, (_, target) in enumerate(dashboard_targets())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    text = ", ".join(f'{key}="{value}"' for key, value in {**labels, "job": "leasesite"}.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def _alert(alertname: str, at: str, *expected: dict[str, str]) -> dict:
    """An expectation: the alert's exact labels at ``at`` (none given: it must not fire)."""
    return {
        "eval_time": at,
        "alertname": alertname,
        "exp_alerts": [{"exp_labels": labels} for labels in expected],
    }


@needs_promtool
def test_promtool_unit_tests_of_the_alert_rules(tmp_path):
    """The rules fire when they should and stay quiet otherwise (annotations left out: wording changes)."""
    document = yaml.safe_load(ALERTS_FILE.read_text(encoding="utf-8"))
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_path = tmp_path / "alerts.yml"
    rules_path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    job = "leasesite_job_last_success_timestamp_seconds"
    tests = [
        {  # The heartbeat stops at 10 min: firing 2 min later plus "for".
            "interval": "1m",
            "input_series": [_series(job, {"task": "leasesite.heartbeat"}, "0+60x10 600x20")],
            "alert_rule_test": [
                _alert("LeasesiteHeartbeatStale", "10m"),
                _alert(
                    "LeasesiteHeartbeatStale",
                    "20m",
                    {"job": "leasesite", "task": "leasesite.heartbeat", "severity": "critical"},
                ),
            ],
        },
        {  # Nothing succeeds after t=0: the 5-minute job is stale at 3 h, the 6-hourly refresh is not.
            "interval": "1m",
            "input_series": [
                _series(job, {"task": task}, "0x600")
                for task in (
                    "leases.sync_joins",
                    "tokens.refresh_tokens",
                    "tokens.cleanup_tokens",
                    "leasesite.heartbeat",
                )
            ],
            "alert_rule_test": [
                _alert(
                    "LeasesiteJobStale", "3h", {"job": "leasesite", "task": "leases.sync_joins", "severity": "warning"}
                ),
                _alert(
                    "LeasesiteJobStale",
                    "8h",
                    {"job": "leasesite", "task": "leases.sync_joins", "severity": "warning"},
                    {"job": "leasesite", "task": "tokens.refresh_tokens", "severity": "warning"},
                ),
            ],
        },
        {  # Half of the tokens failing for 30 min.
            "interval": "1m",
            "input_series": [
                _series("leasesite_baoming_tokens", {"state": "all"}, "10x60"),
                _series("leasesite_baoming_tokens", {"state": "failing"}, "5x60"),
            ],
            "alert_rule_test": [
                _alert("LeasesiteTokensFailing", "20m"),
                _alert("LeasesiteTokensFailing", "40m", {"job": "leasesite", "severity": "warning"}),
            ],
        },
        {  # A failed refresh run alerts; a skipped cleanup does not.
            "interval": "1m",
            "input_series": [
                _series("leasesite_token_refresh_last_run_timestamp_seconds", {"status": "failed"}, "60x20"),
                _series("leasesite_token_cleanup_last_run_timestamp_seconds", {"status": "skipped"}, "60x20"),
            ],
            "alert_rule_test": [
                _alert(
                    "LeasesiteRefreshRunFailed", "10m", {"job": "leasesite", "status": "failed", "severity": "critical"}
                ),
                _alert("LeasesiteCleanupRunFailed", "10m"),
            ],
        },
        {  # Half of the 报名工具 calls transient; the provider's one call a minute is too few to judge.
            "interval": "1m",
            "input_series": [
                _series("leasesite_upstream_requests_total", {"upstream": "baoming", "outcome": "valid"}, "0+10x60"),
                _series(
                    "leasesite_upstream_requests_total", {"upstream": "baoming", "outcome": "transient"}, "0+10x60"
                ),
                _series(
                    "leasesite_upstream_requests_total", {"upstream": "provider", "outcome": "timeout"}, "0+0.5x60"
                ),
            ],
            "alert_rule_test": [
                _alert("LeasesiteUpstreamErrors", "40m", {"upstream": "baoming", "severity": "warning"}),
            ],
        },
    ]
    test_path = tmp_path / "alerts-test.yml"
    test_path.write_text(
        yaml.safe_dump({"rule_files": [str(rules_path)], "evaluation_interval": "1m", "tests": tests}),
        encoding="utf-8",
    )
    result = promtool("test", "rules", str(test_path))
    assert result.returncode == 0, result.stdout + result.stderr
