"""deploy/ agrees with itself, with otel-collector.yaml, with Compter's settings and with SPEC §4.

No Docker engine runs here: the Dockerfile and the compose file are checked as files.
promtool (Debian's `prometheus` package, installed by .ci/install-deploy-tools) checks and
unit-tests the alert rules; without it those tests skip, except under CI=true.
"""

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

from compter.cli import GRACEFUL_TIMEOUT_S
from compter.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SPEC = ROOT.parent / "shared" / "SPEC.md"
# What the OTLP exporters may take to flush on shutdown: their default timeout (OTEL_EXPORTER_OTLP_TIMEOUT).
TELEMETRY_FLUSH_S = 10
PORT = Settings().port


def unavailable(reason: str) -> NoReturn:
    """Skip for that reason, except under CI=true, where everything these tests need must be there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The path of a command that .ci/install-deploy-tools installs."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"`{name}` is not installed (bash .ci/install-deploy-tools installs it)")
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --- SPEC §4: the names every rule and panel may use ------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpecNames:
    metrics: frozenset[str]
    labels: frozenset[str]
    otel_variables: frozenset[str]


@pytest.fixture(scope="module")
def spec() -> SpecNames:
    """Metric and label names from SPEC §4's table, and the OTEL_* variables SPEC names."""
    if not SPEC.exists():
        unavailable(f"{SPEC} is not there: the shared/ folder sits beside the repository")
    text = SPEC.read_text()
    metrics, labels = set(), set()
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[3].startswith("`compter_"):
            continue
        kind, attributes, name = cells[1], cells[2], cells[3].strip("`")
        metrics.add(name)
        if kind.startswith("Histogram"):
            metrics |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        labels |= {attribute.replace(".", "_") for attribute in re.findall(r"`(compter\.[a-z_.]+)`", attributes)}
    assert len(metrics) >= 9, "SPEC §4's metrics table was not found"
    return SpecNames(frozenset(metrics), frozenset(labels), frozenset(re.findall(r"\bOTEL_[A-Z_]+[A-Z]", text)))


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """The compter_* metric names and the compter_* label names a PromQL expression uses."""
    without_strings = _STRING.sub('""', expr)
    labels = {name for group in _GROUPING.findall(without_strings) for name in re.findall(r"\w+", group)}
    labels |= {
        name for matchers in _MATCHERS.findall(without_strings) for name in re.findall(r"(\w+)\s*[=!]", matchers)
    }
    bare = _MATCHERS.sub("", _GROUPING.sub("", without_strings))
    metrics = set(re.findall(r"\bcompter_\w+", bare))
    return metrics, {label for label in labels if label.startswith("compter_")}


def template_labels(text: str) -> set[str]:
    """compter_* labels named in `{{ $labels.x }}`, `{{x}}` and `${__field.labels.x}` templates."""
    return set(re.findall(r"(?:\$labels\.|\{\{\s*|__field\.labels\.)(compter_\w+)", text))


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "grafana" / "compter.json").read_text())
    return loaded


def dashboard_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_exprs() -> Iterator[str]:
    for panel in dashboard_panels():
        for target in panel["targets"]:
            yield target["expr"]
    for annotation in dashboard()["annotations"]["list"]:
        yield annotation["expr"]


def test_promql_names_tells_metrics_from_labels() -> None:
    metrics, labels = promql_names(
        'sum by (compter_debt_name) (rate(compter_payments_total{compter_debt_id="1", job=~"compter_x"}[5m]))'
        " and on (compter_debt_id) compter_debt_overdue"
    )
    assert metrics == {"compter_payments_total", "compter_debt_overdue"}
    assert labels == {"compter_debt_name", "compter_debt_id"}


def test_spec_table_gives_the_names(spec: SpecNames) -> None:
    assert {"compter_payments_total", "compter_debt_overdue", "compter_stage_duration_seconds_bucket"} <= spec.metrics
    assert "compter_debt_count_bucket" not in spec.metrics  # a Gauge has no buckets
    assert {"compter_debt_id", "compter_debt_name", "compter_payment_name", "compter_debt_status"} == spec.labels
    assert {"OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_METRIC_EXPORT_INTERVAL"} <= spec.otel_variables


def test_alert_rules_use_only_spec_metrics_and_labels(spec: SpecNames) -> None:
    used_metrics, used_labels = set(), set()
    for rule in alert_rules():
        metrics, labels = promql_names(rule["expr"])
        used_metrics |= metrics
        used_labels |= labels | template_labels(json.dumps(rule.get("annotations", {})))
    assert used_metrics - spec.metrics == set()
    assert used_labels - spec.labels == set()
    assert {"compter_debt_overdue", "compter_payments_total", "compter_debt_timeouts_total"} <= used_metrics


def test_dashboard_uses_only_spec_metrics_and_labels(spec: SpecNames) -> None:
    used_metrics, used_labels = set(), set()
    for expr in dashboard_exprs():
        metrics, labels = promql_names(expr)
        used_metrics |= metrics
        used_labels |= labels
    text = json.dumps(dashboard())
    used_labels |= template_labels(text) | set(re.findall(r"label_values\((compter_\w+)\)", text))
    assert used_metrics - spec.metrics == set()
    assert used_labels - spec.labels == set()
    assert {"compter_debt_count", "compter_debt_overdue", "compter_payments_total"} <= used_metrics
    assert {"compter_stage_duration_seconds_bucket", "compter_debt_timeouts_total"} <= used_metrics


# --- promtool ----------------------------------------------------------------------------------


def promtool(*args: str, cwd: Path = DEPLOY / "prometheus") -> str:
    done = subprocess.run(
        [require_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"promtool {shlex.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_promtool_checks_the_rules_and_the_prometheus_config() -> None:
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")


def test_promtool_unit_tests_every_alert() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")
    tested = {
        test["alertname"]
        for case in load_yaml(DEPLOY / "prometheus" / "alerts_test.yml")["tests"]
        for test in case["alert_rule_test"]
    }
    assert tested == {rule["alert"] for rule in alert_rules()}


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel's PromQL, with Grafana's variables filled in, as a recording rule promtool parses."""
    filled = [
        expr.replace("$__rate_interval", "1m").replace("$debt", ".*").replace("$__range", "1h")
        for expr in dashboard_exprs()
    ]
    rules = {
        "groups": [{"name": "dashboard", "rules": [{"record": f"panel:{i}", "expr": e} for i, e in enumerate(filled)]}]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(filled)} rules found" in promtool("check", "rules", "dashboard.yml", cwd=tmp_path)


# --- the OpenTelemetry Collector ---------------------------------------------------------------


def collector() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(ROOT / "otel-collector.yaml")
    return loaded


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def collector_otlp_ports() -> dict[str, int]:
    """The collector's OTLP ports by Compter's OTEL_EXPORTER_OTLP_PROTOCOL value."""
    protocols = collector()["receivers"]["otlp"]["protocols"]
    return {"grpc": port_of(protocols["grpc"]["endpoint"]), "http/protobuf": port_of(protocols["http"]["endpoint"])}


def collector_prometheus_port() -> int:
    return port_of(collector()["exporters"]["prometheus"]["endpoint"])


def assert_sends_otlp_to_collector(environment: dict[str, str], collector_host: str) -> None:
    endpoint = urlsplit(environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
    protocol = environment.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    assert (endpoint.hostname, endpoint.port) == (collector_host, collector_otlp_ports()[protocol])


def known_variables(spec: SpecNames) -> set[str]:
    return {f"COMPTER_{field.name.upper()}" for field in dataclasses.fields(Settings)} | spec.otel_variables


def test_collector_pipelines_carry_every_signal() -> None:
    pipelines = collector()["service"]["pipelines"]
    assert set(pipelines) == {"metrics", "traces", "logs"}
    assert all("otlp" in pipeline["receivers"] for pipeline in pipelines.values())
    assert "prometheus" in pipelines["metrics"]["exporters"]


# --- docker compose ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(DEPLOY / "docker-compose.yml")
    return loaded


def compter_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to deploy/) of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            assert (DEPLOY / source).exists(), f"{source} is mounted but does not exist"
            found[target] = source
    return found


def test_compose_runs_two_compter_replicas_on_the_postgres_store(spec: SpecNames) -> None:
    services = compose()["services"]
    replicas = compter_services()
    assert len(replicas) == 2
    postgres = services["postgres"]["environment"]
    instance_ids = []
    for replica in replicas.values():
        environment = replica["environment"]
        assert set(environment) <= known_variables(spec)
        store = urlsplit(environment["COMPTER_STORE"])
        assert store.scheme == "postgresql"
        assert (store.username, store.password, store.hostname, store.port, store.path) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
            "postgres",
            5432,
            f"/{postgres['POSTGRES_DB']}",
        )
        assert environment["COMPTER_API_TOKEN"] is None, "the token comes from the shell, never from this file"
        assert_sends_otlp_to_collector(environment, "otel-collector")
        instance_ids += re.findall(r"service\.instance\.id=([^,]+)", environment["OTEL_RESOURCE_ATTRIBUTES"])
        assert [port.split(":")[-1] for port in replica["ports"]] == [str(PORT)]
        assert replica["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert float(replica["stop_grace_period"].removesuffix("s")) >= GRACEFUL_TIMEOUT_S + TELEMETRY_FLUSH_S
    assert len(set(instance_ids)) == 2, "each replica needs its own service.instance.id"
    assert all((DEPLOY / replica["build"]["context"]).resolve() == ROOT for replica in replicas.values())


def test_compose_wires_collector_prometheus_grafana_and_jaeger() -> None:
    services = compose()["services"]
    collector_service = services["otel-collector"]
    config_path = collector_service["command"][0].removeprefix("--config=")
    assert mounts(collector_service)[config_path] == "../otel-collector.yaml"
    assert collector_service["environment"]["TRACES_OTLP_ENDPOINT"] == "jaeger:4317"
    assert "jaeger" in services

    prometheus = services["prometheus"]
    config_file = next(arg for arg in prometheus["command"] if arg.startswith("--config.file=")).split("=", 1)[1]
    prometheus_mounts = mounts(prometheus)
    assert prometheus_mounts[config_file] == "./prometheus/prometheus.yml"
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert prometheus_mounts[str(Path(config_file).parent / rule_file)] == f"./prometheus/{rule_file}"
    assert "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["otel-collector"]["static_configs"][0]["targets"] == [f"otel-collector:{collector_prometheus_port()}"]
    assert jobs["otel-collector"]["honor_labels"] is True, "keep job=compter and instance from the collector"
    assert sorted(jobs["compter"]["static_configs"][0]["targets"]) == sorted(f"{n}:{PORT}" for n in compter_services())
    assert jobs["compter"]["metric_relabel_configs"] == [
        {"source_labels": ["__name__"], "regex": ".+", "action": "drop"}
    ], "only `up` from Compter itself: its series come through the collector"

    grafana_mounts = mounts(services["grafana"])
    assert grafana_mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "compter.yml")["providers"][0]
    assert grafana_mounts[f"{provider['options']['path']}/compter.json"] == "./grafana/compter.json"


def grafana_datasources() -> dict[str, dict[str, Any]]:
    loaded = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "compter.yml")
    return {source["uid"]: source for source in loaded["datasources"]}


def test_grafana_datasources_point_at_the_compose_services() -> None:
    sources = grafana_datasources()
    services = compose()["services"]
    for uid, port in (("prometheus", 9090), ("jaeger", 16686)):
        url = urlsplit(sources[uid]["url"])
        assert (url.hostname, url.port) == (uid, port)
        assert f"{port}:{port}" in services[uid]["ports"]


def test_dashboard_datasources_are_provisioned_and_multistage_panels_link_traces() -> None:
    sources = grafana_datasources()
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] in sources
        for target in panel["targets"]:
            assert sources[target["datasource"]["uid"]]["type"] == target["datasource"]["type"]
    multistage = [
        panel
        for panel in dashboard_panels()
        if any(re.search(r"compter_(stage_duration|debt_duration|debt_timeouts)", t["expr"]) for t in panel["targets"])
    ]
    assert len(multistage) >= 3
    for panel in multistage:
        links = panel["fieldConfig"]["defaults"]["links"] + panel["links"]
        for link in links:
            assert '"uid":"jaeger"' in _explore_pane(link["url"])
        assert any("${__field.labels.compter_debt_name" in link["url"] for link in links)


def _explore_pane(url: str) -> str:
    return unquote(parse_qs(urlsplit(url).query)["panes"][0])


# --- Kubernetes --------------------------------------------------------------------------------


def kubernetes() -> dict[str, dict[str, Any]]:
    """The manifests kustomization.yaml lists, by kind."""
    kustomization = load_yaml(DEPLOY / "kubernetes" / "kustomization.yaml")
    manifests = [load_yaml(DEPLOY / "kubernetes" / name) for name in kustomization["resources"]]
    return {manifest["kind"]: manifest for manifest in manifests}


def test_kubernetes_deployment_probes_ports_and_shutdown() -> None:
    manifests = kubernetes()
    deployment = manifests["Deployment"]["spec"]
    assert deployment["replicas"] == 2
    pod = deployment["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    environment = {variable["name"]: variable for variable in container["env"]}
    assert int(environment["COMPTER_PORT"]["value"]) == ports["http"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    pre_stop_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + GRACEFUL_TIMEOUT_S + TELEMETRY_FLUSH_S
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == dict(dockerfile_stages()[-1])["USER"].split(":")[0]

    labels = deployment["template"]["metadata"]["labels"]
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    service = manifests["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert [port["targetPort"] for port in service["ports"]] == ["http"]


def test_kubernetes_secret_and_configmap_feed_the_container(spec: SpecNames) -> None:
    manifests = kubernetes()
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    sources = {next(iter(source)): next(iter(source.values()))["name"] for source in container["envFrom"]}
    assert sources == {
        "secretRef": manifests["Secret"]["metadata"]["name"],
        "configMapRef": manifests["ConfigMap"]["metadata"]["name"],
    }
    assert set(manifests["Secret"]["stringData"]) == {"COMPTER_STORE", "COMPTER_API_TOKEN"}
    assert urlsplit(manifests["Secret"]["stringData"]["COMPTER_STORE"]).scheme in {"postgresql", "redis"}
    otel = manifests["ConfigMap"]["data"]
    assert all(name.startswith("OTEL_") for name in otel)
    assert_sends_otlp_to_collector(otel, "otel-collector")

    known = known_variables(spec)
    env = container["env"]
    values = " ".join(variable.get("value", "") for variable in env)
    for name in [variable["name"] for variable in env] + list(otel) + list(manifests["Secret"]["stringData"]):
        # A helper variable (POD_NAME) is fine when another variable uses it.
        assert name in known or f"$({name})" in values, name
    assert "service.instance.id=$(POD_NAME)" in values


def test_kubectl_kustomize_renders_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests were checked as files only")
    done = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kubernetes")], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    rendered = {document["kind"] for document in yaml.safe_load_all(done.stdout)}
    assert rendered == {"Deployment", "Service", "Secret", "ConfigMap"}


# --- the image ---------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) by build stage, continuation lines joined and comments dropped."""
    lines = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    stages: list[list[tuple[str, str]]] = []
    for line in filter(str.strip, joined.splitlines()):
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def test_dockerfile_runs_compter_as_pid_1_without_root() -> None:
    stages = dockerfile_stages()
    final = dict(stages[-1])
    entrypoint, command = json.loads(final["ENTRYPOINT"]), json.loads(final["CMD"])  # exec form: JSON arrays
    assert entrypoint + command == ["compter", "serve", "--host", "0.0.0.0"]
    user = final["USER"].split(":")[0]
    assert user not in {"root", "0"}
    assert final["EXPOSE"] == str(PORT)
    options, _, check = final["HEALTHCHECK"].partition("CMD ")
    assert "/healthz" in check
    assert isinstance(json.loads(check), list)
    assert "--interval" in options


def test_dockerfile_installs_the_postgres_and_redis_extras() -> None:
    installs = [
        arguments
        for stage in dockerfile_stages()
        for instruction, arguments in stage
        if instruction == "RUN" and " install " in arguments
    ]
    (install,) = installs
    extras = re.search(r"\.\[([a-z,]+)\]", install)
    assert extras is not None
    assert set(extras.group(1).split(",")) == {"postgres", "redis"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {"postgres", "redis"} <= set(pyproject["project"]["optional-dependencies"])
    copied = [
        arguments.split()[0]
        for stage in dockerfile_stages()
        for instruction, arguments in stage
        if instruction == "COPY" and not arguments.startswith("--from")
    ]
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for source in copied:
        assert (ROOT / source).exists()
        assert f"!{source.rstrip('/')}" in ignore.replace("/\n", "\n"), f"{source} is not in the build context"


# --- bare metal --------------------------------------------------------------------------------


def systemd_unit() -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    for line in (DEPLOY / "systemd" / "compter.service").read_text().splitlines():
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            section[key] = value
    return sections


def test_systemd_unit_serves_and_stops_gracefully() -> None:
    service = systemd_unit()["Service"]
    assert service["ExecStart"].endswith("/compter serve")
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= GRACEFUL_TIMEOUT_S + TELEMETRY_FLUSH_S
    assert service["EnvironmentFile"].startswith("-"), "the settings file is optional"
    assert service["DynamicUser"] == "yes"
    assert urlsplit(service["Environment"].split("=", 1)[1]).path.startswith(f"/var/lib/{service['StateDirectory']}/")


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit was checked as a file only")
    compter = str(Path(sys.executable).parent / "compter")
    unit = (DEPLOY / "systemd" / "compter.service").read_text().replace("/opt/compter/bin/compter", compter)
    (tmp_path / "compter.service").write_text(unit)
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / "compter.service")], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
