"""The Grafana dashboards that ship in manifests/components/dashboards, without Grafana: each is well-formed, each
panel's query parses (promtool) and reads only series the operator and the server export, the component ships
every one of them, and check_queries (what runs the panels against a real Prometheus) reports what it must."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from support.dashboards import (
    DASHBOARDS,
    check_queries,
    concrete,
    dashboards,
    known_metric_names,
    metric_names,
    panel_queries,
    variable_queries,
    variables_used,
)
from support.prometheus import require_prometheus, require_promtool, run_prometheus

GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}
BOARDS = dashboards()


def all_panels(panels: list[dict]) -> list[dict]:
    return [p for panel in panels for p in (panel, *all_panels(panel.get("panels") or []))]


def test_the_four_dashboards_are_there():
    assert {board["title"] for board in BOARDS.values()} == {
        "Kiln / Training",
        "Kiln / Compression",
        "Kiln / Serving",
        "Kiln / Operator",
    }
    assert len({board["uid"] for board in BOARDS.values()}) == len(BOARDS)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_each_dashboard_is_well_formed(name):
    text = (DASHBOARDS / name).read_text()
    board = json.loads(text)
    assert board["uid"] == name.removesuffix(".json")
    assert len(board["uid"]) <= 40  # Grafana's limit
    assert "kiln" in board["tags"]
    assert isinstance(board["schemaVersion"], int)
    assert "id" not in board  # an id is Grafana's own: a provisioned dashboard must not carry another's
    variables = board["templating"]["list"]
    names = [v["name"] for v in variables]
    assert len(names) == len(set(names))
    assert variables[0] == {**variables[0], "name": "datasource", "type": "datasource", "query": "prometheus"}
    panels = all_panels(board["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    titles = [p["title"] for p in panels if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles repeat (check_queries names panels by title)"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("description"), panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            unknown = variables_used(target["expr"]) - set(names) - GRAFANA_VARIABLES
            assert not unknown, (panel["title"], unknown)
    for variable in variables[1:]:
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variable["allValue"] == ".*"  # the queries select with =~
        assert not variables_used(variable["definition"]) - set(names[: names.index(variable["name"])])


def test_every_panel_query_parses(tmp_path):
    queries = panel_queries()
    assert len(queries) > 40
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"kiln:dashboard_query:{i}", "expr": concrete(q.expr)} for i, q in enumerate(queries)
                ],
            }
        ]
    }
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [require_promtool(), "check", "rules", "queries.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_query_reads_only_series_that_are_exported():
    known = known_metric_names() | {"up"}
    for query in [*panel_queries(), *variable_queries()]:
        names = metric_names(query.expr)
        assert names, query  # reads something
        assert not names - known, (query.dashboard, query.title, names - known)


def test_the_component_ships_every_dashboard_as_a_sidecar_configmap():
    spec = yaml.safe_load((DASHBOARDS / "kustomization.yaml").read_text())
    assert spec["kind"] == "Component"
    shipped = [f for generator in spec["configMapGenerator"] for f in generator["files"]]
    assert sorted(shipped) == sorted(BOARDS)
    for generator in spec["configMapGenerator"]:
        assert len(generator["files"]) == 1  # one dashboard per ConfigMap: each well under the 1 MiB limit
        options = generator["options"]
        assert options["disableNameSuffixHash"] is True
        assert options["labels"]["grafana_dashboard"] == "1"


def test_concrete_replaces_grafana_variables_in_every_syntax():
    expr = 'rate(x{a=~"$namespace", b=~"${deployment}", c=~"${revision:regex}", d=~"[[job]]"}[$__rate_interval])'
    assert concrete(expr) == 'rate(x{a=~".*", b=~".*", c=~".*", d=~".*"}[1m])'
    assert concrete("increase(x[$__range])", {"__range": "5m"}) == "increase(x[5m])"
    assert concrete('x{namespace=~"$namespace"}', {"namespace": "shop"}) == 'x{namespace=~"shop"}'


def test_check_queries_reports_queries_that_fail_or_return_nothing(tmp_path):
    require_prometheus()
    items = [
        ("Board", "answers", "vector(1)"),
        ("Board", "a scalar", "time()"),
        ("Board", "nothing scraped by that name", 'absent_metric_xyz{namespace=~"$namespace"}'),
        ("Board", "does not parse", "sum(rate(x[$__rate_interval])"),
        ("Board", "variables replaced", 'up{job=~"$job"} or vector(1)'),
    ]
    with run_prometheus(tmp_path, [], expected=0) as url:
        failures = check_queries(url, items)
    assert len(failures) == 2, failures
    assert failures[0].startswith('Board / nothing scraped by that name: absent_metric_xyz{namespace=~".*"}: empty')
    assert failures[1].startswith("Board / does not parse: sum(rate(x[1m]): bad_data: ")
