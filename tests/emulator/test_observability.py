"""Observability of the testbed: the Grafana dashboard, the Prometheus configs, live metrics.

The dashboard is checked against a model of what Grafana 11 needs of a dashboard JSON
(no Grafana here), and every one of its panel queries is run against a real Prometheus
(Debian's ``prometheus``) that scraped a real run, once on the local backend (the
controller and one agent process per device, each serving /metrics on its own loopback
port; ``on_finished`` holds them up until every target was scraped after generation ended)
and once on the docker testbed (Prometheus on this host scrapes the containers on their
internal network, the targets written once the project is up). The queries cover the run.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgepart.emulator.broker import free_port
from edgepart.emulator.scenario import Scenario, parse_scenario

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "compose" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "edgepart.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "edgepart.yaml"
COMPOSE_PROMETHEUS = REPO / "compose" / "prometheus.yml"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)

SCRAPE_S = 1.0
#: what Grafana makes of $__rate_interval at a 1 s scrape interval and a 1 s step:
#: max(4 x scrape interval, step + scrape interval)
RATE_INTERVAL = "4s"
#: the values Grafana substitutes for the dashboard's variables ("All" of each)
VARIABLES = {
    "__rate_interval": RATE_INTERVAL,
    "__interval": "1s",
    "device": ".*",
    "run": ".*",
    "algorithm": ".*",
}
WAIT_S = 90.0  # bound of every wait on Prometheus or the run

# no proxy for loopback, whatever the environment says
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- a model of the Grafana 11 dashboard JSON (the fields it needs, as it needs them) ----------


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class DatasourceRef(_Model):
    type: Literal["prometheus"]
    uid: str = Field(min_length=1)


class GridPos(_Model):
    h: int = Field(gt=0)
    w: int = Field(gt=0, le=24)
    x: int = Field(ge=0, lt=24)
    y: int = Field(ge=0)

    @model_validator(mode="after")
    def _fits(self) -> GridPos:
        if self.x + self.w > 24:
            raise ValueError(f"x + w = {self.x + self.w} exceeds the 24-column grid")
        return self


class Target(_Model):
    refId: str = Field(min_length=1)
    expr: str = Field(min_length=1)
    datasource: DatasourceRef
    legendFormat: str | None = None


class FieldConfig(_Model):
    defaults: dict[str, Any]
    overrides: list[dict[str, Any]]


class Panel(_Model):
    id: int = Field(gt=0)
    type: Literal["timeseries", "stat"]
    title: str = Field(min_length=1)
    gridPos: GridPos
    datasource: DatasourceRef
    targets: list[Target] = Field(min_length=1)
    fieldConfig: FieldConfig
    options: dict[str, Any]

    @model_validator(mode="after")
    def _unique_refs(self) -> Panel:
        refs = [t.refId for t in self.targets]
        if len(refs) != len(set(refs)):
            raise ValueError(f"panel {self.title!r}: refIds repeat: {refs}")
        return self


class VariableQuery(_Model):
    query: str = Field(min_length=1)
    refId: str


class Variable(_Model):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: Literal["query"]
    datasource: DatasourceRef
    query: VariableQuery
    refresh: Literal[1, 2]
    multi: bool
    includeAll: bool
    allValue: str | None = None


class Templating(_Model):
    list: list[Variable]


class TimeRange(_Model):
    from_: str = Field(alias="from")
    to: str


class Dashboard(_Model):
    id: int | None = None
    uid: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")
    title: str = Field(min_length=1)
    schemaVersion: Literal[39]
    version: int = Field(ge=0)
    editable: bool
    tags: list[str]
    time: TimeRange
    refresh: str
    timezone: str
    templating: Templating
    panels: list[Panel] = Field(min_length=1)

    @model_validator(mode="after")
    def _layout(self) -> Dashboard:
        ids = [p.id for p in self.panels]
        if len(ids) != len(set(ids)):
            raise ValueError(f"panel ids repeat: {ids}")
        cells: dict[tuple[int, int], str] = {}
        for p in self.panels:
            g = p.gridPos
            for x in range(g.x, g.x + g.w):
                for y in range(g.y, g.y + g.h):
                    if (x, y) in cells:
                        raise ValueError(f"{p.title!r} overlaps {cells[x, y]!r} at {(x, y)}")
                    cells[x, y] = p.title
        return self


def _dashboard_json() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _load_dashboard() -> Dashboard:
    return Dashboard.model_validate_json(DASHBOARD.read_text(encoding="utf-8"))


def _panels() -> list[dict[str, Any]]:
    return _dashboard_json()["panels"]


def concrete(expr: str) -> str:
    """The query Grafana sends for an expr: its variables replaced by VARIABLES' values."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in VARIABLES:
            raise KeyError(f"variable ${name} in {expr!r} has no test value")
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


# -- static checks --------------------------------------------------------------------------


def test_the_dashboard_is_a_grafana_11_dashboard() -> None:
    board = _load_dashboard()
    assert {p.type for p in board.panels} <= {"timeseries", "stat"}
    # every panel names its datasource by the uid the provisioning gives it
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {d["uid"] for d in provisioned}
    refs = [p.datasource for p in board.panels]
    refs += [t.datasource for p in board.panels for t in p.targets]
    refs += [v.datasource for v in board.templating.list]
    assert {r.uid for r in refs} <= uids


def test_the_dashboard_model_rejects_what_grafana_would() -> None:
    good = _dashboard_json()
    _load_dashboard()  # the file as it is passes
    first = good["panels"][0]
    off_grid = {**first, "id": 999, "gridPos": {"h": 8, "w": 8, "x": 20, "y": 200}}
    broken = [
        {**good, "schemaVersion": "39"},
        {**good, "panels": [*good["panels"], off_grid]},
        {**good, "panels": [first, first]},  # ids repeat, panels overlap
        {**good, "panels": [{**first, "targets": []}]},
        {**good, "panels": [{**first, "type": "graph"}]},  # gone in Grafana 11
        {**good, "panels": [{**first, "gridPos": {"h": 8, "w": 8}}]},
    ]
    for board in broken:
        with pytest.raises(ValueError):
            Dashboard.model_validate_json(json.dumps(board))


def test_the_provisioning_points_at_the_testbed_prometheus_and_the_dashboards() -> None:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["access"] == "proxy"
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


def _exposed_names() -> set[str]:
    """Every sample name the controller's and an agent's /metrics can show."""
    from edgepart.controller.metrics import ControllerMetrics
    from edgepart.device_agent.metrics import AgentMetrics

    agent = AgentMetrics(SimpleNamespace(name="d"))  # type: ignore[arg-type]
    controller = ControllerMetrics("run", "myopic")
    families = [*controller.registry.collect(), *agent.step_time.collect()]
    families += [*agent.layer_time.collect(), *agent.collector.describe()]
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + s for f in families for s in suffixes[f.type]}


def test_every_query_uses_metrics_the_processes_expose() -> None:
    exposed = _exposed_names()
    board = _load_dashboard()
    exprs = [t.expr for p in board.panels for t in p.targets]
    exprs += [v.query.query for v in board.templating.list]
    used = {name for e in exprs for name in re.findall(r"\bedgepart_\w+", e)}
    assert used, "the dashboard queries no edgepart metric"
    assert used <= exposed, f"not exposed by any edgepart process: {sorted(used - exposed)}"
    for e in exprs:
        concrete(e)  # every variable has a value the live test can use


@needs_promtool
def test_compose_prometheus_config_passes_promtool() -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "config", str(COMPOSE_PROMETHEUS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = {j["job_name"] for j in yaml.safe_load(COMPOSE_PROMETHEUS.read_text())["scrape_configs"]}
    assert {"edgepart-controller", "edgepart-agents"} <= jobs


# -- a live run scraped by a real Prometheus ------------------------------------------------


def _scenario() -> Scenario:
    """lan-3, cut to a few tokens, with its load trace early so a re-plan can react."""
    raw = yaml.safe_load((REPO / "scenarios" / "lan-3.yaml").read_text())
    raw.update(
        generate_tokens=12,
        replan_every=4,
        traces=[{"at_token": 4, "device": "desktop", "background_load": 0.9}],
    )
    return parse_scenario(raw, "lan-3")


def _get(port: int, path: str, **params: Any) -> Any:
    query = "?" + urllib.parse.urlencode(params) if params else ""
    with _http.open(f"http://127.0.0.1:{port}{path}{query}", timeout=10) as response:
        body = response.read()
    return json.loads(body) if path.startswith("/api/") else body


def _wait(
    what: str,
    check: Callable[[], bool],
    timeout_s: float = WAIT_S,
    detail: Callable[[], object] = lambda: "",
) -> None:
    """Poll check() until it holds; fail naming ``what`` (and ``detail()``) after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except OSError:  # not listening yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} {detail()}")
        time.sleep(0.2)


def _rfc3339(text: str) -> float:
    """Unix time of Prometheus's RFC 3339 timestamps (nanoseconds cut to microseconds)."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    return datetime.fromisoformat(text).timestamp()


def _distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class Live:
    """What the live run left for the tests: Prometheus's port, the run's time span, scrapes."""

    prometheus: int
    start: float
    devices: list[str]
    end: float = 0.0
    targets: list[dict] = field(default_factory=list)
    scrapes: dict[str, bytes] = field(default_factory=dict)
    run: Any = None
    backend: str = "local"


def _prometheus_config(work: Path) -> dict:
    """Targets come from files (written once the endpoints are known, read at once)."""
    return {
        "global": {"scrape_interval": f"{SCRAPE_S:g}s", "scrape_timeout": f"{SCRAPE_S:g}s"},
        "scrape_configs": [
            {
                "job_name": f"edgepart-{job}",
                "file_sd_configs": [{"files": [str(work / f"{job}.json")]}],
            }
            for job in ("controller", "agents")
        ],
    }


def _write_targets(work: Path, controller: str | None, agents: list[str]) -> None:
    for job, targets in (("controller", [controller] if controller else []), ("agents", agents)):
        tmp = work / f"{job}.json.tmp"
        tmp.write_text(json.dumps([{"targets": targets}]))
        tmp.replace(work / f"{job}.json")  # whole or nothing for Prometheus's file watch


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _every_target_scraped(web: int, state: Live, count: int, after: float) -> None:
    """Wait until Prometheus has scraped all count targets successfully since ``after``."""

    def scraped() -> bool:
        active = _get(web, "/api/v1/targets", state="active")["data"]["activeTargets"]
        state.targets = active
        return len(active) == count and all(
            t["health"] == "up" and _rfc3339(t["lastScrape"]) > after + SCRAPE_S for t in active
        )

    def health() -> list[tuple]:
        return [
            (t["scrapeUrl"], t["health"], t["lastScrape"], t["lastError"]) for t in state.targets
        ]

    _wait("Prometheus to scrape every target", scraped, detail=health)


def _run_local(scenario: Scenario, work: Path, web: int, state: Live) -> None:
    """The testbed as processes on this machine, each serving /metrics on loopback."""
    from edgepart.emulator.backends.local import run_local

    controller, *agent_ports = _distinct_ports(1 + len(state.devices))
    agents = dict(zip(state.devices, agent_ports, strict=True))
    _write_targets(work, f"127.0.0.1:{controller}", [f"127.0.0.1:{p}" for p in agents.values()])
    endpoints = {"controller": controller, **agents}

    def on_finished(_result) -> None:
        # the run is over but nothing is stopped yet: wait for Prometheus to have every
        # target up and scraped once more since, so it holds the final values
        _every_target_scraped(web, state, len(endpoints), time.time())
        state.scrapes = {n: _get(p, "/metrics") for n, p in endpoints.items()}
        state.end = time.time()

    state.run = run_local(
        scenario,
        "myopic",
        work_dir=work / "out",
        metrics_port=controller,
        agent_metrics_ports=agents,
        on_finished=on_finished,
    )


def _run_docker(scenario: Scenario, work: Path, web: int, state: Live) -> None:
    """The testbed in containers; Prometheus on this host scrapes them on their network."""
    from edgepart.emulator.backends.docker import run_docker
    from edgepart.emulator.compose import METRICS_PORT
    from edgepart.emulator.images import DEFAULT_TAG, build_image

    build_image(DEFAULT_TAG)
    started: list[float] = []

    def on_started(addresses: dict[str, str]) -> None:
        agents = [f"{addresses[d]}:{METRICS_PORT}" for d in state.devices]
        _write_targets(work, f"{addresses['controller']}:{METRICS_PORT}", agents)
        started.append(time.time())

    def on_finished() -> None:
        # the controller's container ends with the run: every target must have been up and
        # scraped during it (its series then cover the run)
        def each_up_once() -> bool:
            answer = _get(web, "/api/v1/query", query="max_over_time(up[10m])")
            values = [float(r["value"][1]) for r in answer["data"]["result"]]
            return len(values) == 1 + len(state.devices) and min(values) == 1.0

        _wait("every container scraped while up", each_up_once)
        state.targets = _get(web, "/api/v1/targets", state="active")["data"]["activeTargets"]
        state.end = time.time()

    state.run = run_docker(
        scenario,
        scenario.to_yaml(),
        "myopic",
        work_dir=work / "out",
        on_started=on_started,
        on_finished=on_finished,
    )
    assert started, "the testbed never reported its containers"


@pytest.fixture(scope="module", params=["local", "docker"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    """A run of lan-3 on a backend, scraped by Prometheus every second (stopped after)."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    backend = request.param
    if backend == "docker":
        from edgepart.emulator.images import docker_available

        if not docker_available():
            pytest.skip("the Docker engine is not running")
    work = tmp_path_factory.mktemp(f"observability-{backend}")
    scenario = _scenario()
    (web,) = _distinct_ports(1)
    _write_targets(work, None, [])  # nothing yet: the runs say where to scrape
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(_prometheus_config(work)))
    log = (work / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def ready() -> bool:
            assert process.poll() is None, (work / "prometheus.log").read_text()
            return _get(web, "/-/ready").startswith(b"Prometheus")

        _wait("Prometheus to be ready", ready)
        state = Live(prometheus=web, start=time.time(), devices=list(scenario.device_names))
        state.backend = backend
        (_run_local if backend == "local" else _run_docker)(scenario, work, web, state)
        yield state
    finally:
        _stop(process)
        log.close()
    assert process.poll() is not None, "prometheus outlived the test"


def test_prometheus_scraped_the_controller_and_every_agent(live: Live) -> None:
    jobs = sorted(t["labels"]["job"] for t in live.targets)
    assert jobs == ["edgepart-agents"] * len(live.devices) + ["edgepart-controller"]
    if live.backend == "local":  # a container's run ends with its controller
        assert all(t["health"] == "up" for t in live.targets), live.targets
    assert live.run.result.output_token_ids  # the run itself went through


@needs_promtool
# the local backend's scrapes only: the docker roles run the same code
@pytest.mark.parametrize("live", ["local"], indirect=True)
@pytest.mark.parametrize("endpoint", ["controller", "laptop", "desktop", "nuc"])
def test_promtool_finds_no_problem_in_a_live_scrape(live: Live, endpoint: str) -> None:
    assert PROMTOOL is not None
    body = live.scrapes[endpoint]
    assert b"edgepart_" in body
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    report = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0 and not report.strip(), report


def _query_range(live: Live, expr: str) -> list[dict]:
    answer = _get(
        live.prometheus,
        "/api/v1/query_range",
        query=concrete(expr),
        start=f"{live.start:.3f}",
        end=f"{live.end:.3f}",
        step=f"{SCRAPE_S:g}s",
    )
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.parametrize("panel", _panels(), ids=lambda p: f"{p['id']}-{p['title']}")
def test_every_panel_query_returns_data(live: Live, panel: dict) -> None:
    finite = 0
    for target in panel["targets"]:
        series = _query_range(live, target["expr"])
        assert series and all(s["values"] for s in series), (
            f"{panel['title']!r} target {target['refId']}: no data for {concrete(target['expr'])}"
        )
        finite += sum(math.isfinite(float(v)) for s in series for _, v in s["values"])
    assert finite, f"{panel['title']!r}: every value is NaN or infinite"


def test_the_variables_list_every_device_the_run_and_its_algorithm(live: Live) -> None:
    expected = {"device": sorted(live.devices), "algorithm": ["myopic"]}
    for variable in _dashboard_json()["templating"]["list"]:
        metric = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
        assert metric is not None
        answer = _get(
            live.prometheus,
            f"/api/v1/label/{metric.group(2)}/values",
            **{"match[]": metric.group(1), "start": f"{live.start:.3f}", "end": f"{live.end:.3f}"},
        )
        values = sorted(answer["data"])
        if variable["name"] == "run":  # the scenario's testbed and when the run started
            assert len(values) == 1 and values[0].startswith("lan-3-"), values
        else:
            assert values == expected[variable["name"]]
