"""Configuration from OTEL_* variables: resource, exporter choice, protocol, endpoints, switches."""

import asyncio
import logging
import os
import uuid
from collections.abc import Iterator, Mapping

import pytest
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from compter import __version__
from compter.model import PaymentRequest
from compter.otel import Signal, build_resource, build_telemetry, exporters, otlp_endpoint, otlp_protocol
from compter.service import Service
from compter.store.memory import MemoryStore

SIGNALS: list[Signal] = ["metrics", "logs", "traces"]


@pytest.fixture
def built() -> Iterator[list[object]]:
    """Exporters a test builds, shut down afterwards so that no session or channel is left open."""
    made: list[object] = []
    yield made
    for exporter in made:
        exporter.shutdown()  # type: ignore[attr-defined]


def kinds(environ: Mapping[str, str], signal: Signal, built: list[object]) -> list[type]:
    found = exporters(environ, signal)
    built.extend(found)
    return [type(exporter) for exporter in found]


def test_the_resource_defaults_to_compter_with_its_version_and_an_instance_id() -> None:
    attributes = build_resource({}).attributes
    assert attributes["service.name"] == "compter"
    assert attributes["service.version"] == __version__
    assert uuid.UUID(str(attributes["service.instance.id"]))
    assert build_resource({}).attributes["service.instance.id"] != attributes["service.instance.id"]


def test_otel_resource_attributes_then_otel_service_name_win(caplog: pytest.LogCaptureFixture) -> None:
    environ = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=billing, team=sre%20ops,broken,service.version=9"}
    with caplog.at_level(logging.WARNING):
        attributes = build_resource(environ).attributes
    assert attributes["service.name"] == "billing"
    assert attributes["team"] == "sre ops"
    assert attributes["service.version"] == "9"
    assert "'broken'" in caplog.text
    assert build_resource({**environ, "OTEL_SERVICE_NAME": "compter-eu"}).attributes["service.name"] == "compter-eu"


@pytest.mark.parametrize(
    ("environ", "signal", "endpoint"),
    [
        ({}, "metrics", None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "metrics", "http://collector:4318/v1/metrics"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "logs", "http://collector:4318/v1/logs"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "traces",
            "http://collector:4317",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b/traces"},
            "traces",
            "http://b/traces",
        ),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b/traces"}, "metrics", None),
    ],
)
def test_otlp_endpoint(environ: dict[str, str], signal: Signal, endpoint: str | None) -> None:
    assert otlp_endpoint(environ, signal) == endpoint


def test_otlp_protocol_defaults_to_http_protobuf_and_the_signal_variable_wins(caplog: pytest.LogCaptureFixture) -> None:
    assert otlp_protocol({}, "metrics") == "http/protobuf"
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "metrics") == "grpc"
    both = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "http/protobuf"}
    assert otlp_protocol(both, "logs") == "http/protobuf"
    assert otlp_protocol(both, "traces") == "grpc"
    with caplog.at_level(logging.WARNING):
        assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "traces") == "http/protobuf"
    assert "OTEL_EXPORTER_OTLP_PROTOCOL" in caplog.text


@pytest.mark.parametrize("signal", SIGNALS)
def test_without_an_endpoint_no_otlp_exporter_is_built(signal: Signal, built: list[object]) -> None:
    assert kinds({}, signal, built) == []
    assert kinds({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, signal, built) == []


def test_with_an_endpoint_every_signal_goes_over_http_by_default(built: list[object]) -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert [kinds(environ, signal, built) for signal in SIGNALS] == [
        [HttpMetricExporter],
        [HttpLogExporter],
        [HttpSpanExporter],
    ]


def test_grpc_when_the_protocol_says_so(built: list[object]) -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert [kinds(environ, signal, built) for signal in SIGNALS] == [
        [GrpcMetricExporter],
        [GrpcLogExporter],
        [GrpcSpanExporter],
    ]


def test_the_exporter_variables_choose_otlp_console_or_none(
    built: list[object], caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert kinds({**endpoint, "OTEL_TRACES_EXPORTER": "none"}, "traces", built) == []
    assert kinds({**endpoint, "OTEL_LOGS_EXPORTER": "console"}, "logs", built) == [ConsoleLogRecordExporter]
    assert kinds({**endpoint, "OTEL_METRICS_EXPORTER": "otlp, console"}, "metrics", built) == [
        HttpMetricExporter,
        ConsoleMetricExporter,
    ]
    assert kinds({"OTEL_TRACES_EXPORTER": "console"}, "traces", built) == [ConsoleSpanExporter]
    assert kinds({**endpoint, "OTEL_METRICS_EXPORTER": "prometheus"}, "metrics", built) == []
    with caplog.at_level(logging.WARNING):
        assert kinds({**endpoint, "OTEL_LOGS_EXPORTER": "zipkin,otlp"}, "logs", built) == [HttpLogExporter]
    assert "OTEL_LOGS_EXPORTER: unknown exporter 'zipkin'" in caplog.text


def payment_scraped(environ: Mapping[str, str]) -> bytes:
    """What /metrics shows after one payment, with telemetry built from `environ`."""
    telemetry = build_telemetry(environ, max_debts=10)
    try:
        asyncio.run(Service(MemoryStore(), telemetry).pay(1, PaymentRequest({"interval": 60.0})))
        return telemetry.prometheus_text()[0]
    finally:
        telemetry.shutdown()


def test_metrics_are_scraped_without_any_exporter() -> None:
    assert b'compter_payments_total{compter_debt_id="1"} 1.0' in payment_scraped({"OTEL_METRICS_EXPORTER": "none"})


def test_otel_sdk_disabled_builds_no_exporter_and_metrics_are_still_scraped(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    environ = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    with caplog.at_level(logging.WARNING):
        assert b'compter_payments_total{compter_debt_id="1"} 1.0' in payment_scraped(environ)
    assert caplog.text == "", "no exporter was built, so none complains about the unreachable endpoint"
    assert os.environ["OTEL_SDK_DISABLED"] == "true", "the process environment is left as it was"


def test_a_bad_export_interval_is_named_and_the_default_kept(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        payment_scraped({"OTEL_METRIC_EXPORT_INTERVAL": "soon", "OTEL_METRICS_EXPORTER": "none"})
    assert "OTEL_METRIC_EXPORT_INTERVAL: 'soon' is not a positive number of milliseconds; using 60000" in caplog.text
