"""An OTLP receiver inside the test: OTLP/HTTP and OTLP/gRPC, decoded with opentelemetry-proto.

It keeps every request it receives, so tests assert on what really went over
the wire, the way a collector would have seen it.
"""

import contextlib
import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.realprocess import free_port

T = TypeVar("T")


def value_of(value: AnyValue) -> Any:
    """An OTLP AnyValue as the Python value it carries."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return None if kind is None else getattr(value, kind)


def attributes_of(attributes: Any) -> dict[str, Any]:
    pairs: list[KeyValue] = list(attributes)
    return {pair.key: value_of(pair.value) for pair in pairs}


@dataclass(frozen=True)
class Point:
    """One data point of a metric, with the resource it came from."""

    metric: str
    attributes: dict[str, Any]
    value: float
    resource: dict[str, Any]
    time_unix_nano: int


@dataclass(frozen=True)
class Record:
    """One log record (an event), with the resource it came from."""

    record: LogRecord
    resource: dict[str, Any]

    @property
    def event_name(self) -> str:
        return self.record.event_name

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes_of(self.record.attributes)


class Received:
    """What the receiver got, in arrival order; safe to read while it keeps receiving."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.logs: list[logs_service_pb2.ExportLogsServiceRequest] = []
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def add(self, request: Message) -> None:
        with self._lock:
            if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
                self.metrics.append(request)
            elif isinstance(request, logs_service_pb2.ExportLogsServiceRequest):
                self.logs.append(request)
            else:
                assert isinstance(request, trace_service_pb2.ExportTraceServiceRequest)
                self.traces.append(request)

    def points(self, name: str) -> list[Point]:
        """Every data point of metric `name`, oldest first."""
        with self._lock:
            requests = list(self.metrics)
        found = []
        for request in requests:
            for resource_metrics in request.resource_metrics:
                resource = attributes_of(resource_metrics.resource.attributes)
                for scope in resource_metrics.scope_metrics:
                    for metric in scope.metrics:
                        if metric.name == name:
                            found.extend(_points(metric, resource))
        return found

    def latest(self, name: str) -> dict[str, float]:
        """The last value of each series of metric `name`, by its `compter.debt.id` (or its only attribute)."""
        latest: dict[str, float] = {}
        for point in self.points(name):
            key = point.attributes.get("compter.debt.id") or next(iter(point.attributes.values()), "")
            latest[str(key)] = point.value
        return latest

    def last_export(self, name: str) -> list[Point]:
        """The points of metric `name` in the last export that carried it."""
        points = self.points(name)
        if not points:
            return []
        last = points[-1].time_unix_nano
        return [point for point in points if point.time_unix_nano == last]

    def records(self) -> list[Record]:
        with self._lock:
            requests = list(self.logs)
        return [
            Record(record, attributes_of(resource_logs.resource.attributes))
            for request in requests
            for resource_logs in request.resource_logs
            for scope in resource_logs.scope_logs
            for record in scope.log_records
        ]

    def spans(self) -> list[Span]:
        """Every span received, in arrival order."""
        with self._lock:
            requests = list(self.traces)
        return [
            span
            for request in requests
            for resource_spans in request.resource_spans
            for scope in resource_spans.scope_spans
            for span in scope.spans
        ]


def _points(metric: Metric, resource: dict[str, Any]) -> list[Point]:
    kind = metric.WhichOneof("data")
    if kind in ("sum", "gauge"):
        return [
            Point(
                metric.name,
                attributes_of(point.attributes),
                point.as_double if point.HasField("as_double") else point.as_int,
                resource,
                point.time_unix_nano,
            )
            for point in getattr(metric, kind).data_points
        ]
    assert kind == "histogram", kind
    return [
        Point(metric.name, attributes_of(point.attributes), point.count, resource, point.time_unix_nano)
        for point in metric.histogram.data_points
    ]


def wait_for(check: Callable[[], T], timeout_s: float = 15.0, what: str = "the receiver") -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


_HTTP_PATHS: dict[str, type[Message]] = {
    "/v1/metrics": metrics_service_pb2.ExportMetricsServiceRequest,
    "/v1/logs": logs_service_pb2.ExportLogsServiceRequest,
    "/v1/traces": trace_service_pb2.ExportTraceServiceRequest,
}
_HTTP_RESPONSES: dict[str, type[Message]] = {
    "/v1/metrics": metrics_service_pb2.ExportMetricsServiceResponse,
    "/v1/logs": logs_service_pb2.ExportLogsServiceResponse,
    "/v1/traces": trace_service_pb2.ExportTraceServiceResponse,
}


@contextlib.contextmanager
def http_receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/HTTP (protobuf) endpoint on a free port: its base URL and what it receives."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request_type = _HTTP_PATHS.get(self.path)
            if request_type is None:
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = request_type()
            request.ParseFromString(body)
            received.add(request)
            answer = _HTTP_RESPONSES[self.path]().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            """Keep the test output quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, received: Received) -> None:
        self._received = received

    def Export(self, request: Any, context: Any) -> Any:
        self._received.add(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, received: Received) -> None:
        self._received = received

    def Export(self, request: Any, context: Any) -> Any:
        self._received.add(request)
        return logs_service_pb2.ExportLogsServiceResponse()


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self._received = received

    def Export(self, request: Any, context: Any) -> Any:
        self._received.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/gRPC endpoint on a free port: its URL (http://, so plaintext) and what it receives."""
    received = Received()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(received), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(received), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(received), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=None)


@contextlib.contextmanager
def receiver(protocol: str) -> Iterator[tuple[str, Received]]:
    """The receiver for an OTEL_EXPORTER_OTLP_PROTOCOL value."""
    with grpc_receiver() if protocol == "grpc" else http_receiver() as found:
        yield found


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """A collector that accepts connections and never answers: the worst a collector can do."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()


def refusing_endpoint() -> str:
    """A collector that is down: nothing listens on the port."""
    return f"http://127.0.0.1:{free_port()}"
