"""The shipped Prometheus alert rules and Grafana dashboard: promtool checks the rules and
runs their unit tests, every query parses, and every metric they name is one a live
fastserve exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import needs_promtool, promtool
from fastserve.server import Server

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALERTS = CONFIGS / "prometheus" / "alerts.yml"
DASHBOARD = CONFIGS / "grafana" / "fastserve.json"


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in doc["panels"] for t in panel["targets"]]


def alert_exprs() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """fastserve metric families an expression reads (histogram/counter suffixes removed)."""
    names = set(re.findall(r"\bfastserve_[a-z_]+", expr))
    return {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in names}


@needs_promtool
def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts.test.yml", cwd=ALERTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_unit_tested() -> None:
    rules = {
        rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }  # fmt: skip
    tests = yaml.safe_load((ALERTS.parent / "alerts.test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert fired == rules


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "fastserve" and doc["title"] and isinstance(doc["schemaVersion"], int)
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert set(variables) == {"datasource", "model", "version"}
    assert variables["datasource"]["type"] == "datasource"
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        assert panel["type"] in ("timeseries", "stat", "table") and panel["title"]
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= set(grid) and grid["x"] + grid["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"]
            assert target["datasource"]["uid"] == "${datasource}"


@needs_promtool
def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses PromQL in rule files: each query becomes a recording rule, with
    Grafana's variables replaced by what they stand for."""
    rules = [
        {"record": f"fastserve:dashboard_{i}", "expr": expr.replace("$__rate_interval", "5m")
         .replace("$model", ".*").replace("$version", ".*")}
        for i, expr in enumerate(dashboard_exprs())
    ]  # fmt: skip
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


async def test_every_metric_the_configs_name_is_exposed(
    server: Server, client: aiohttp.ClientSession
) -> None:
    async with client.get("/metrics") as resp:
        text = await resp.text()
    exposed = {family.name for family in text_string_to_metric_families(text)}
    named = set().union(*(metric_names(e) for e in [*dashboard_exprs(), *alert_exprs()]))
    assert named, "no metric found in the configs"
    assert named <= exposed, sorted(named - exposed)
