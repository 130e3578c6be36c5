"""The alerts that ship in manifests/components/alerts: every rule passes promtool's check, every alert fires and
stays quiet where it should on the series fixtures under tests/fixtures/alerts (promtool test rules), and every
alert says who it is about and links a section of docs/runbook.md that exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support.dashboards import REPO, alerts, known_metric_names, metric_names, rule_groups, write_rule_file
from support.prometheus import require_promtool

FIXTURES = REPO / "tests/fixtures/alerts"
RUNBOOK = REPO / "docs/runbook.md"
SEVERITIES = {"critical", "warning", "info"}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_promtool(), *args], cwd=cwd, capture_output=True, text=True, check=False)


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings."""
    out = set()
    for line in markdown.splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out


def test_every_rule_passes_promtool_check(tmp_path):
    rules = write_rule_file(tmp_path / "kiln-rules.yaml")
    result = promtool("check", "rules", rules.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(g["rules"]) for g in rule_groups())
    assert f"SUCCESS: {count} rules found" in result.stdout


def test_every_alert_fires_and_stays_quiet_on_its_fixtures(tmp_path):
    write_rule_file(tmp_path / "kiln-rules.yaml")
    fixtures = sorted(FIXTURES.glob("*.yaml"))
    for fixture in fixtures:
        shutil.copy(fixture, tmp_path / fixture.name)
    result = promtool("test", "rules", *(f.name for f in fixtures), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(fixtures), result.stdout


def test_the_fixtures_cover_each_alert_firing_and_not_firing():
    firing: set[str] = set()
    quiet: set[str] = set()
    for fixture in sorted(FIXTURES.glob("*.yaml")):
        spec = yaml.safe_load(fixture.read_text())
        assert spec["rule_files"] == ["kiln-rules.yaml"], fixture.name
        for test in spec["tests"]:
            for case in test.get("alert_rule_test") or []:
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never seen firing"
    assert names - quiet == set(), "alerts never seen staying quiet"
    assert (firing | quiet) - names == set(), "fixtures test alerts that no longer exist"


def test_the_alerts_named_in_the_issue_are_all_there():
    assert {rule["alert"] for rule in alerts()} == {
        "KilnModelDrift",
        "KilnModelErrorRateHigh",
        "KilnModelLatencyHigh",
        "KilnModelSaturated",
        "KilnModelNoTraffic",
        "KilnCanaryRolledBack",
        "KilnTrainingStalled",
        "KilnTrainingFailed",
        "KilnCompressionRejected",
        "KilnOperatorDown",
        "KilnReconcileErrors",
        "KilnStatusNotReconciled",
    }


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_each_alert_says_what_and_where_and_links_its_runbook_section(rule):
    assert rule["labels"]["severity"] in SEVERITIES
    notes = rule["annotations"]
    assert set(notes) == {"summary", "description", "runbook_url"}
    # Whom it is about: the object's (or the operator's) namespace, in both texts a person reads first.
    for text in (notes["summary"], notes["description"]):
        assert "$labels.namespace" in text, text
    assert "Look:" in notes["description"]  # where to start looking, spelled out
    assert notes["runbook_url"] == f"docs/runbook.md#{rule['alert'].lower()}"
    assert rule["alert"].lower() in anchors(RUNBOOK.read_text())


def test_the_runbook_has_a_section_for_each_alert_and_no_other():
    sections = re.findall(r"^## (Kiln\w+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    assert sorted(sections) == sorted(rule["alert"] for rule in alerts())
    assert len(sections) == len(set(sections))


def test_rules_read_only_metrics_that_exist():
    recorded = {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}
    known = known_metric_names() | recorded | {"up"}
    for group in rule_groups():
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, (rule.get("alert") or rule.get("record"), unknown)


def test_the_operations_doc_patch_example_still_points_at_the_rule_it_names():
    text = (REPO / "docs/operations.md").read_text()
    (test,) = re.findall(r"\{op: test, path: /spec/groups/(\d+)/rules/(\d+)/alert, value: (\w+)\}", text)
    group, index, name = int(test[0]), int(test[1]), test[2]
    assert rule_groups()[group]["rules"][index]["alert"] == name
