"""Monitoring: docker/prometheus.yml, the Grafana dashboard, and both against a live mamp server and a live
Prometheus scraping it (Prometheus from the Debian package `prometheus`, which .ci/run installs)."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "mamp.json"
TINY_MODEL = REPO.parent / "shared" / "assets" / "models" / "stories260K"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SERVED_NAME = "tiny-llama"

# The series the server promises (issue 5); the dashboard must show each of them.
GAUGES = [
    "mamp:weight_memory_bytes", "mamp:weight_memory_bf16_bytes", "mamp:weight_memory_saving_ratio",
    "mamp:process_resident_memory_bytes", "mamp:cuda_memory_allocated_bytes", "mamp:cuda_memory_reserved_bytes",
    "mamp:kv_cache_usage_bytes", "mamp:kv_cache_capacity_bytes", "mamp:num_requests_running",
    "mamp:num_requests_waiting",
    # issue 18: the KV cache in its dtype and as 16 bits, its saving and blocks
    "mamp:kv_cache_usage_16bit_bytes", "mamp:kv_cache_capacity_16bit_bytes", "mamp:kv_cache_saving_ratio",
    "mamp:kv_cache_blocks_used", "mamp:kv_cache_blocks_free",
]
COUNTERS = ["mamp:requests_finished", "mamp:requests_failed", "mamp:prompt_tokens", "mamp:generation_tokens",
            "mamp:num_preemptions"]
HISTOGRAMS = [
    "mamp:time_to_first_token_seconds", "mamp:inter_token_latency_seconds", "mamp:e2e_request_latency_seconds",
    "mamp:request_queue_time_seconds", "mamp:request_prompt_tokens", "mamp:request_generation_tokens",
]
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
SUFFIX_KINDS = {"_bucket": "histogram", "_sum": "histogram", "_count": "histogram", "_total": "counter"}


def require_tool(name: str, how: str) -> str:
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is missing in CI; .ci/run installs it ({how})")
        pytest.skip(f"{name} not installed ({how})")
    return path


# ---------------------------------------------------------------------------------------------- the dashboard

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels of collapsed rows
    return out


def dashboard_exprs() -> list[str]:
    """Every PromQL expression: panel targets and the query of each query variable."""
    exprs = [t["expr"] for p in panels() for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def metric_names(expr: str) -> set[str]:
    """Identifiers naming mamp series in a PromQL expression (label names and values are stripped first)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    without_matchers = re.sub(r"\{[^}]*\}", "", without_strings)
    return {name for name in METRIC_NAME.findall(without_matchers) if "mamp:" in name}


def family_of(name: str, families: dict[str, str]) -> tuple[str, str] | None:
    """('mamp:x_seconds', 'histogram') for 'mamp:x_seconds_bucket' and so on; None when nothing exports it."""
    if name in families:
        return name, families[name]
    for suffix, kind in SUFFIX_KINDS.items():
        base = name.removesuffix(suffix)
        if base != name and families.get(base) == kind:
            return base, kind
    return None


def promql_for_prometheus(expr: str, rate_interval: str = "1m") -> str:
    """The expression as Grafana sends it with every model selected."""
    return expr.replace("$__rate_interval", rate_interval).replace("$model_name", ".*")


def test_dashboard_shows_every_promised_series():
    used = set().union(*map(metric_names, dashboard_exprs()))
    expected = set(GAUGES) | {c + "_total" for c in COUNTERS} | {h + "_bucket" for h in HISTOGRAMS}
    assert expected - used == set()


def test_dashboard_filters_every_series_by_the_model_name_variable():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    model = variables["model_name"]
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert query == "label_values(mamp:weight_memory_bytes, model_name)"
    assert model["includeAll"] and model["allValue"] == ".*"
    for panel in panels():
        for target in panel.get("targets", []):
            for match in re.finditer(r"mamp:[a-zA-Z0-9_:]+(\{[^}]*\})?", target["expr"]):
                assert match.group(1) == '{model_name=~"$model_name"}', (panel["title"], target["expr"])


def test_dashboard_latency_panels_are_histogram_quantiles():
    for histogram in HISTOGRAMS:
        exprs = [e for e in dashboard_exprs() if histogram + "_bucket" in e]
        assert exprs, histogram
        for expr in exprs:
            assert re.fullmatch(
                rf"histogram_quantile\(0\.\d+, sum by \(le(, model_name)?\) \(rate\({re.escape(histogram)}_bucket"
                r"\{[^}]*\}\[\$__rate_interval\]\)\)\)", expr), expr


def test_dashboard_layout_is_well_formed():
    board = dashboard()
    assert board["uid"] == "mamp" and board["refresh"]
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in panels():
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not (cells & area), f"panel {panel['title']!r} overlaps another"
        cells |= area
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"]


def test_prometheus_config_passes_promtool():
    promtool = require_tool("promtool", "apt-get install prometheus")
    result = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["server:8000"]
    assert config["global"]["scrape_interval"] == "5s"


# ---------------------------------------------------------------------------------------------- live processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group this test started, then SIGKILL what is left."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


def wait_until(ready, process: subprocess.Popen, log: Path, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            value = ready()
            if value:
                return value
        except (httpx.HTTPError, OSError):
            pass  # not listening yet
        time.sleep(0.25)
    pytest.fail(f"{what} not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


class Live:
    def __init__(self, url: str, process: subprocess.Popen):
        self.url, self.process = url, process

    def get(self, path: str, **params) -> httpx.Response:
        return httpx.get(self.url + path, params=params, timeout=30)


@pytest.fixture(scope="module")
def mamp_server(tmp_path_factory):
    """The real server, started through docker/entrypoint.sh as the image starts it, on the tiny stories260K
    Llama; one completion and one failed request have been sent, so the labelled series exist."""
    if not TINY_MODEL.is_dir():
        pytest.skip(f"tiny test model not found at {TINY_MODEL}")
    if not (REPO / "server" / "__main__.py").exists() and not IN_CI:
        pytest.skip("server/__main__.py does not exist yet")
    workdir = tmp_path_factory.mktemp("mamp_server")
    log = workdir / "server.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMP_")}
    # MAMP_HOST keeps the server on loopback; --port, given after the entrypoint's default, must win.
    port_file = workdir / "mamp.port"  # where the entrypoint records the port it serves, for the HEALTHCHECK
    env.update(MAMP_HOST="127.0.0.1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MAMP_PORT_FILE=str(port_file))
    command = ["bash", str(DOCKER / "entrypoint.sh"), "--model", str(TINY_MODEL), "--port", str(port),
               "--served-model-name", SERVED_NAME, "--device", "cpu", "--max-num-seqs", "2"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = Live(f"http://127.0.0.1:{port}", process)
    server.port_file = port_file
    try:
        wait_until(lambda: server.get("/health").status_code == 200, process, log, 180, "mamp server")
        completion = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "model": SERVED_NAME, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
        assert completion.status_code == 200, completion.text
        failed = httpx.post(server.url + "/v1/completions", timeout=30, json={
            "model": "no-such-model", "prompt": "x", "max_tokens": 1})
        assert failed.status_code >= 400
        yield server
    finally:
        stop(process)


def scrape(server: Live) -> list:
    response = server.get("/metrics")
    assert response.status_code == 200
    return list(text_string_to_metric_families(response.text))


def test_dashboard_queries_only_metrics_the_server_exports(mamp_server):
    families = {f.name: f.type for f in scrape(mamp_server)}
    for expr in dashboard_exprs():
        for name in metric_names(expr):
            found = family_of(name, families)
            assert found, f"{name} (in {expr!r}) is not exported by the server"
            kind = found[1]
            if kind == "counter":
                assert re.search(rf"rate\({re.escape(name)}\b", expr), f"counter {name} used without rate: {expr}"
            if kind == "histogram":
                assert name.endswith(("_bucket", "_sum", "_count")), f"histogram {name} used raw: {expr}"


def test_server_labels_every_mamp_series_with_the_model_name(mamp_server):
    families = {f.name: f for f in scrape(mamp_server)}
    assert {g: "gauge" for g in GAUGES}.items() <= {n: f.type for n, f in families.items()}.items()
    for family in families.values():
        if family.name.startswith("mamp:"):
            for sample in family.samples:
                assert sample.labels.get("model_name") == SERVED_NAME, sample
    assert families["mamp:weight_memory_bytes"].samples, "the model_name variable reads this series"


def test_image_healthcheck_passes_against_the_live_server(mamp_server):
    dockerfile = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    check = json.loads(re.search(r"^HEALTHCHECK .*? CMD (\[.*\])$", dockerfile, re.MULTILINE).group(1))
    check[0] = sys.executable if check[0] == "python" else check[0]
    port = mamp_server.url.rsplit(":", 1)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMP_")}
    # the port the entrypoint recorded (it was given as --port), whatever MAMP_PORT says
    assert mamp_server.port_file.read_text().strip() == port
    recorded = {**env, "MAMP_PORT_FILE": str(mamp_server.port_file), "MAMP_PORT": str(free_port())}
    assert subprocess.run(check, env=recorded, timeout=30).returncode == 0
    assert subprocess.run(check, env={**env, "MAMP_PORT_FILE": "/nonexistent", "MAMP_PORT": port},
                          timeout=30).returncode == 0
    dead = subprocess.run(check, env={**env, "MAMP_PORT_FILE": "/nonexistent", "MAMP_PORT": str(free_port())},
                          capture_output=True, timeout=30)
    assert dead.returncode != 0


@pytest.fixture(scope="module")
def prometheus(mamp_server, tmp_path_factory):
    """A real Prometheus on loopback scraping the live server every second."""
    binary = require_tool("prometheus", "apt-get install prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"] = [{"targets": [mamp_server.url.removeprefix("http://")]}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    live = Live(f"http://127.0.0.1:{port}", process)
    live.log = log
    try:
        wait_until(lambda: live.get("/-/ready").status_code == 200, process, log, 60, "prometheus")
        yield live
    finally:
        stop(process)


def query(prometheus: Live, expr: str) -> list[dict]:
    response = prometheus.get("/api/v1/query", query=expr)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_prometheus_reads_the_saving_ratio_the_server_reports(mamp_server, prometheus):
    result = wait_until(lambda: query(prometheus, "mamp:weight_memory_saving_ratio"), prometheus.process,
                        prometheus.log, 30, "a scrape of the mamp server")
    families = {f.name: f for f in scrape(mamp_server)}
    (sample,) = families["mamp:weight_memory_saving_ratio"].samples
    (series,) = result
    assert series["metric"]["model_name"] == SERVED_NAME and series["metric"]["job"] == "mamp"
    assert math.isclose(float(series["value"][1]), sample.value, rel_tol=1e-12, abs_tol=1e-12)


def test_every_dashboard_query_runs_in_prometheus(mamp_server, prometheus):
    wait_until(lambda: query(prometheus, "mamp:weight_memory_bytes"), prometheus.process, prometheus.log, 30,
               "a scrape of the mamp server")
    for expr in dashboard_exprs():
        if expr.startswith("label_values("):
            metric, label = re.fullmatch(r"label_values\((\S+), (\w+)\)", expr).groups()
            response = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": metric})
            assert SERVED_NAME in response.json()["data"], response.text
            continue
        result = query(prometheus, promql_for_prometheus(expr))
        if "rate(" not in expr:  # gauges have a value after the first scrape; rates need two and traffic
            assert result, f"no data for {expr}"
