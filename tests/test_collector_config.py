"""otel-collector.yaml: every pipeline names defined components, and the ports are the ones Compter sends to."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from compter.otel import otlp_endpoint

CONFIG = Path(__file__).parent.parent / "otel-collector.yaml"
SECTIONS = ("receivers", "processors", "exporters", "connectors")


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    return loaded


def kind(component: str) -> str:
    """A component id's type: `otlp_grpc/traces` is an `otlp_grpc`."""
    return component.split("/", 1)[0]


def test_every_pipeline_names_only_defined_components(config: dict[str, Any]) -> None:
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"metrics", "logs", "traces"}
    for name, pipeline in pipelines.items():
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline.get(section, []):
                defined = config.get(section, {}) or {}
                assert component in defined or component in (config.get("connectors") or {}), (
                    f"pipeline {name} uses {section[:-1]} {component!r}, which is not defined"
                )
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"], f"extension {extension!r} is not defined"


def test_every_defined_component_is_used(config: dict[str, Any]) -> None:
    pipelines = config["service"]["pipelines"].values()
    used = {component for pipeline in pipelines for section in SECTIONS for component in pipeline.get(section, [])}
    defined = {component for section in SECTIONS for component in config.get(section) or {}}
    assert defined == used


def test_otlp_is_received_on_every_interface_at_the_standard_ports(config: dict[str, Any]) -> None:
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"


def test_compter_pointed_at_the_collector_reaches_its_receivers(config: dict[str, Any]) -> None:
    """The URL docs/telemetry.md gives, with Compter's default protocol and with grpc, lands on these ports."""
    ports = {name: int(p["endpoint"].rsplit(":", 1)[1]) for name, p in config["receivers"]["otlp"]["protocols"].items()}
    over_http = otlp_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4318"}, "metrics")
    assert over_http == f"http://otel-collector:{ports['http']}/v1/metrics"
    grpc = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert otlp_endpoint(grpc, "traces") == f"http://otel-collector:{ports['grpc']}"


def test_each_signal_goes_where_issue_3_says(config: dict[str, Any]) -> None:
    pipelines = config["service"]["pipelines"]
    for pipeline in pipelines.values():
        assert pipeline["receivers"] == ["otlp"]
        assert pipeline["processors"][0] == "memory_limiter", "memory_limiter must come first"
        assert "batch" in pipeline["processors"]
    assert [kind(exporter) for exporter in pipelines["metrics"]["exporters"]] == ["prometheus"]
    assert [kind(exporter) for exporter in pipelines["traces"]["exporters"]] == ["otlp_grpc"]
    assert [kind(exporter) for exporter in pipelines["logs"]["exporters"]] == ["debug"]
    assert config["exporters"]["prometheus"]["endpoint"].startswith("0.0.0.0:")
    assert config["exporters"]["otlp_grpc/traces"]["endpoint"]


def test_health_check_extension_is_on(config: dict[str, Any]) -> None:
    assert config["service"]["extensions"] == ["health_check"]
    assert config["extensions"]["health_check"]["endpoint"] == "0.0.0.0:13133"
