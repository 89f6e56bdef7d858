"""Builds the OpenTelemetry SDK from the standard OTEL_* variables, at startup only.

The SDK reads some OTEL_* variables by itself (headers, timeouts, sampler,
limits), but not the exporter choice, the protocol or the endpoint when the
exporters are built in code: those are read here, from `environ`.
"""

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Literal
from urllib.parse import unquote

from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, ConsoleLogRecordExporter, LogRecordExporter
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricExporter, MetricReader
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader as PeriodicReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import CollectorRegistry

from compter import __version__
from compter.telemetry import StoredIds, Telemetry, metric_views

log = logging.getLogger(__name__)

Signal = Literal["metrics", "logs", "traces"]
PROTOCOLS = ("http/protobuf", "grpc")
# Spans are few, and a stage span should reach the trace view while the deploy runs (the SDK waits 5 s).
DEFAULT_SPAN_DELAY_MS = 1000.0
# The most SIGTERM waits for telemetry to flush when a collector does not answer.
SHUTDOWN_TIMEOUT_S = 5.0

_OTLP: dict[tuple[str, Signal], Callable[[str], MetricExporter | LogRecordExporter | SpanExporter]] = {
    ("http/protobuf", "metrics"): lambda endpoint: HttpMetricExporter(endpoint=endpoint),
    ("http/protobuf", "logs"): lambda endpoint: HttpLogExporter(endpoint=endpoint),
    ("http/protobuf", "traces"): lambda endpoint: HttpSpanExporter(endpoint=endpoint),
    ("grpc", "metrics"): lambda endpoint: GrpcMetricExporter(endpoint=endpoint),
    ("grpc", "logs"): lambda endpoint: GrpcLogExporter(endpoint=endpoint),
    ("grpc", "traces"): lambda endpoint: GrpcSpanExporter(endpoint=endpoint),
}
_CONSOLE: dict[Signal, Callable[[], MetricExporter | LogRecordExporter | SpanExporter]] = {
    "metrics": ConsoleMetricExporter,
    "logs": ConsoleLogRecordExporter,
    "traces": ConsoleSpanExporter,
}


class _Throttle(logging.Filter):
    """Let each repeated message through once a period: with a collector down, the SDK warns on every item it
    drops and the exporters on every retry."""

    def __init__(self, period_s: float) -> None:
        super().__init__()
        self._period_s = period_s
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = (record.name, record.msg)
        if now - self._last.get(key, -self._period_s) < self._period_s:
            return False
        self._last[key] = now
        return True


_THROTTLE = _Throttle(period_s=60.0)
_NOISY_LOGGERS = (
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.exporter.otlp.proto.http._log_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
)


def build_telemetry(environ: Mapping[str, str], *, max_debts: int) -> Telemetry:
    """The SDK providers, readers and exporters that OTEL_* asks for, behind Compter's emitters.

    `/metrics` is served from its own registry whatever the exporters, even with
    OTEL_SDK_DISABLED=true, which turns off every export (OTLP and console).
    """
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).addFilter(_THROTTLE)
    disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    resource = build_resource(environ)
    registry = CollectorRegistry()
    tracer_provider = TracerProvider(resource=resource, id_generator=StoredIds(), shutdown_on_exit=False)
    logger_provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
    readers: list[MetricReader] = [PrometheusMetricReader(scope_info_enabled=False, registry=registry)]
    if not disabled:
        interval_ms = _milliseconds(environ, "OTEL_METRIC_EXPORT_INTERVAL", 60_000.0)
        timeout_ms = _milliseconds(environ, "OTEL_METRIC_EXPORT_TIMEOUT", 30_000.0)
        for metric_exporter in exporters(environ, "metrics"):
            assert isinstance(metric_exporter, MetricExporter)
            readers.append(PeriodicReader(metric_exporter, interval_ms, timeout_ms))
        for log_exporter in exporters(environ, "logs"):
            assert isinstance(log_exporter, LogRecordExporter)
            logger_provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter))
        span_delay_ms = _milliseconds(environ, "OTEL_BSP_SCHEDULE_DELAY", DEFAULT_SPAN_DELAY_MS)
        for span_exporter in exporters(environ, "traces"):
            assert isinstance(span_exporter, SpanExporter)
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter, schedule_delay_millis=span_delay_ms))
    with _sdk_enabled():
        meter_provider = MeterProvider(
            metric_readers=readers,
            resource=resource,
            views=metric_views(max_debts),
            # No measurement is taken inside a sampled span, so exemplars would always be empty: skip their cost.
            exemplar_filter=None if "OTEL_METRICS_EXEMPLAR_FILTER" in environ else AlwaysOffExemplarFilter(),
            shutdown_on_exit=False,
        )

    def shutdown() -> None:
        """Flush and stop the providers side by side; a collector that does not answer holds the exit for at most
        SHUTDOWN_TIMEOUT_S (the SDK would wait out every exporter's timeout and retries in turn)."""
        stopping = [
            threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
            for provider in (tracer_provider, logger_provider, meter_provider)
        ]
        for thread in stopping:
            thread.start()
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        for thread in stopping:
            thread.join(max(0.0, deadline - time.monotonic()))

    return Telemetry(
        meter_provider=meter_provider,
        logger_provider=logger_provider,
        tracer_provider=tracer_provider,
        registry=registry,
        max_debts=max_debts,
        shutdown=shutdown,
    )


@contextlib.contextmanager
def _sdk_enabled() -> Iterator[None]:
    """Hide OTEL_SDK_DISABLED from the SDK's MeterProvider, which reads it from the process environment when built.

    SPEC: `/metrics` always works. It is Compter's own endpoint, so it keeps its metrics
    when OpenTelemetry is switched off; no exporter is built then.
    """
    hidden = os.environ.pop("OTEL_SDK_DISABLED", None)
    try:
        yield
    finally:
        if hidden is not None:
            os.environ["OTEL_SDK_DISABLED"] = hidden


def build_resource(environ: Mapping[str, str]) -> Resource:
    """Compter's defaults, overridden by OTEL_RESOURCE_ATTRIBUTES, overridden by OTEL_SERVICE_NAME."""
    attributes: dict[str, str] = {
        "service.name": "compter",
        "service.version": __version__,
        "service.instance.id": str(uuid.uuid4()),
    }
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
        elif item.strip():
            log.warning("OTEL_RESOURCE_ATTRIBUTES: %r is not key=value; ignored", item)
    service_name = environ.get("OTEL_SERVICE_NAME", "").strip()
    if service_name:
        attributes["service.name"] = service_name
    return Resource(attributes)


def exporters(environ: Mapping[str, str], signal: Signal) -> list[MetricExporter | LogRecordExporter | SpanExporter]:
    """The exporters OTEL_<SIGNAL>_EXPORTER names (default otlp); otlp only when an endpoint is set."""
    variable = f"OTEL_{signal.upper()}_EXPORTER"
    found: list[MetricExporter | LogRecordExporter | SpanExporter] = []
    for name in (part.strip().lower() for part in environ.get(variable, "otlp").split(",")):
        if name == "otlp":
            endpoint = otlp_endpoint(environ, signal)
            if endpoint is not None:
                found.append(_OTLP[otlp_protocol(environ, signal), signal](endpoint))
        elif name == "console":
            found.append(_CONSOLE[signal]())
        elif name in ("none", "") or (signal == "metrics" and name == "prometheus"):
            continue  # /metrics is always served
        else:
            log.warning("%s: unknown exporter %r ignored; use otlp, console or none", variable, name)
    return found


def otlp_protocol(environ: Mapping[str, str], signal: Signal) -> str:
    variable = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    if not environ.get(variable, "").strip():
        variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = environ.get(variable, "").strip().lower() or "http/protobuf"
    if protocol not in PROTOCOLS:
        log.warning("%s: %r is not supported; using http/protobuf (or set it to grpc)", variable, protocol)
        return "http/protobuf"
    return protocol


def otlp_endpoint(environ: Mapping[str, str], signal: Signal) -> str | None:
    """The signal's own endpoint as given, else the shared one (plus /v1/<signal> over HTTP); None if neither."""
    own = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", "").strip()
    if own:
        return own
    shared = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not shared:
        return None
    if otlp_protocol(environ, signal) == "grpc":
        return shared
    return f"{shared.rstrip('/')}/v1/{signal}"


def _milliseconds(environ: Mapping[str, str], variable: str, default: float) -> float:
    value = environ.get(variable, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number <= 0:
        log.warning("%s: %r is not a positive number of milliseconds; using %g", variable, value, default)
        return default
    return number
