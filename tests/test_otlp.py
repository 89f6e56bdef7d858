"""Real `compter serve` processes, configured through OTEL_* variables only, against real OTLP receivers."""

import statistics
import time
from datetime import datetime
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from compter import __version__
from tests.otlp_receiver import Received, receiver, refusing_endpoint, silent_endpoint, wait_for
from tests.realprocess import start_compter

PROTOCOLS = ["http/protobuf", "grpc"]


def otlp_env(endpoint: str, protocol: str, **extra: str) -> dict[str, str]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_METRIC_EXPORT_INTERVAL": "200", **extra}
    if protocol == "grpc":
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
    return env


def unix(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics as {(sample name, labels): value}, without the empty labels Prometheus ignores."""
    text = httpx.get(f"{url}/metrics").text
    return {
        (sample.name, frozenset((k, v) for k, v in sample.labels.items() if v)): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def events_of(received: Received, debt_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (record.event_name, record.attributes)
        for record in received.records()
        if record.attributes.get("compter.debt.id") == debt_id
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metrics_events_and_resource_reach_the_receiver(protocol: str) -> None:
    with (
        receiver(protocol) as (endpoint, received),
        start_compter(env=otlp_env(endpoint, protocol)) as compter,
        httpx.Client(base_url=compter.url) as http,
    ):
        created = http.post("/debts", json={"name": "nightly", "interval": 1}).json()
        debt_id = str(created["id"])
        http.post(f"/debts/{debt_id}")
        paid = http.post(f"/debts/{debt_id}").json()

        wait_for(lambda: received.latest("compter.payments").get(debt_id) == 2, what="2 payments")
        assert received.latest("compter.debt.last_payment")[debt_id] == pytest.approx(unix(paid["updated"]), abs=1e-6)
        assert received.latest("compter.debt.deadline")[debt_id] == pytest.approx(unix(paid["deadline"]), abs=1e-6)
        wait_for(lambda: received.latest("compter.debt.overdue").get(debt_id) == 1, what="overdue 1")
        wait_for(
            lambda: (
                ("compter.debt.overdue", debt_id)
                in {(n, a["compter.debt.id"]) for n, a in events_of(received, debt_id)}
            ),
            what="the overdue event",
        )

        recovered = http.post(f"/debts/{debt_id}", json={"interval": "1h"}).json()
        assert recovered["status"] == "ok"
        wait_for(lambda: received.latest("compter.debt.overdue").get(debt_id) == 0, what="overdue back to 0")
        wait_for(lambda: received.latest("compter.payments").get(debt_id) == 3, what="3 payments")
        counts = {
            point.attributes["compter.debt.status"]: point.value for point in received.last_export("compter.debt.count")
        }
        assert counts["ok"] == 1
        assert counts["overdue"] == 0

        kinds = wait_for(
            lambda: (
                [name for name, _ in events_of(received, debt_id)] if len(events_of(received, debt_id)) >= 6 else None
            ),
            what="six events",
        )
        assert kinds == [
            "compter.debt.created",
            "compter.debt.paid",
            "compter.debt.paid",
            "compter.debt.overdue",
            "compter.debt.paid",
            "compter.debt.recovered",
        ]
        last = events_of(received, debt_id)[-1][1]
        assert last["compter.debt.name"] == "nightly"
        assert last["compter.debt.payments"] == 3
        assert last["compter.debt.interval"] == 3600
        assert last["compter.debt.status"] == "ok"
        assert last["compter.debt.updated"] == recovered["updated"]
        assert last["compter.debt.deadline"] == recovered["deadline"]
        overdue = next(record for record in received.records() if record.event_name == "compter.debt.overdue")
        assert overdue.record.time_unix_nano / 1e9 >= unix(paid["deadline"])
        assert overdue.record.severity_text == "WARN"

        point = received.points("compter.payments")[-1]
        assert point.resource["service.name"] == "compter"
        assert point.resource["service.version"] == __version__
        assert point.resource["service.instance.id"]
        assert received.records()[0].resource == point.resource

        samples = scrape(compter.url)
        labels = frozenset({("compter_debt_id", debt_id), ("compter_debt_name", "nightly")})
        assert samples["compter_payments_total", labels] == 3
        assert samples["compter_debt_overdue", labels] == 0
        assert samples["compter_debt_last_payment_seconds", labels] == pytest.approx(unix(recovered["updated"]))
        assert samples["compter_debt_deadline_seconds", labels] == pytest.approx(unix(recovered["deadline"]))
        assert samples["compter_debt_count", frozenset({("compter_debt_status", "ok")})] == 1


def test_the_flush_at_sigterm_carries_the_gauges() -> None:
    """A process that stops before its first export interval still sends what /metrics showed."""
    with receiver("http/protobuf") as (endpoint, received):
        with start_compter(env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}) as compter:  # the default 60 s interval
            debt_id = str(httpx.post(f"{compter.url}/debts", json={"interval": "1h"}).json()["id"])
            httpx.post(f"{compter.url}/debts/{debt_id}")
            assert compter.stop() == 0
        assert received.latest("compter.payments") == {debt_id: 1}
        assert received.latest("compter.debt.overdue") == {debt_id: 0}
        assert debt_id in received.latest("compter.debt.deadline")
        assert debt_id in received.latest("compter.debt.last_payment")
        counts = {
            point.attributes["compter.debt.status"]: point.value for point in received.last_export("compter.debt.count")
        }
        assert counts["ok"] == 1


def test_otel_service_name_and_resource_attributes_win() -> None:
    env = otlp_env("", "http/protobuf") | {
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=staging,service.name=ignored,team=sre%20ops",
        "OTEL_SERVICE_NAME": "compter-eu",
    }
    with receiver("http/protobuf") as (endpoint, received):
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        with start_compter(env=env) as compter:
            httpx.post(f"{compter.url}/debts", json={"interval": 60})
            record = wait_for(received.records, what="an event")[0]
    assert record.resource["service.name"] == "compter-eu"
    assert record.resource["deployment.environment.name"] == "staging"
    assert record.resource["team"] == "sre ops"
    assert record.resource["service.version"] == __version__


def test_the_metric_export_interval_is_honoured() -> None:
    with receiver("http/protobuf") as (endpoint, received):
        with start_compter(env=otlp_env(endpoint, "http/protobuf", OTEL_METRIC_EXPORT_INTERVAL="300")):
            wait_for(lambda: received.metrics, what="a first export")
            first = len(received.metrics)
            time.sleep(1.5)
            every_300_ms = len(received.metrics) - first
        del received.metrics[:]
        with start_compter(env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}):
            time.sleep(2)
            by_default = len(received.metrics)
    assert 3 <= every_300_ms <= 6
    assert by_default == 0, "the default interval is a minute"


def test_signal_specific_variables_split_the_signals() -> None:
    """Metrics over gRPC to one receiver, logs over HTTP to another, traces off."""
    with receiver("grpc") as (grpc_endpoint, over_grpc), receiver("http/protobuf") as (http_endpoint, over_http):
        env = {
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": grpc_endpoint,
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": http_endpoint,
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
        }
        with start_compter(env=env) as compter, httpx.Client(base_url=compter.url) as http:
            debt_id = str(http.post("/debts", json={"timeout": 60}).json()["id"])
            http.post(f"/debts/{debt_id}", params={"payment": "build", "payoff": "true"})
            wait_for(lambda: over_grpc.latest("compter.payments").get(debt_id) == 1, what="the payment over gRPC")
            wait_for(lambda: len(events_of(over_http, debt_id)) == 3, what="three events over HTTP")
            time.sleep(1.5)  # the span delay is 1 s: a span would have arrived by now
    assert not over_http.metrics
    assert not over_grpc.logs
    assert not over_grpc.traces
    assert not over_http.traces


def test_past_the_cap_metrics_says_so_once_and_keeps_the_totals() -> None:
    with (
        start_compter(env={"COMPTER_METRICS_MAX_DEBTS": "2"}) as compter,
        httpx.Client(base_url=compter.url) as http,
    ):
        ids = [str(http.post("/debts", json={"interval": 60}).json()["id"]) for _ in range(5)]
        for debt_id in ids:
            assert http.post(f"/debts/{debt_id}").status_code == 200
        samples = scrape(compter.url)
        output = compter.output()
    per_debt = {
        dict(labels).get("compter_debt_id", "overflow"): value
        for (name, labels), value in samples.items()
        if name == "compter_payments_total"
    }
    assert per_debt == {ids[0]: 1, ids[1]: 1, "overflow": 3}
    assert {("compter_debt_overdue", frozenset({("compter_debt_id", debt_id)})) for debt_id in ids[:2]} == {
        key for key in samples if key[0] == "compter_debt_overdue"
    }
    assert samples["compter_debt_count", frozenset({("compter_debt_status", "ok")})] == 5
    assert output.count("COMPTER_METRICS_MAX_DEBTS=2") == 1


def test_without_an_endpoint_nothing_is_sent_and_nothing_complains() -> None:
    with start_compter() as compter, httpx.Client(base_url=compter.url) as http:
        debt_id = http.post("/debts", json={"interval": 60}).json()["id"]
        assert http.post(f"/debts/{debt_id}").status_code == 200
        assert ("compter_payments_total", frozenset({("compter_debt_id", str(debt_id))})) in scrape(compter.url)
        assert compter.stop() == 0
        output = compter.output()
    assert "Traceback" not in output
    assert " ERROR " not in output
    assert " WARNING " not in output


def test_sdk_disabled_sends_nothing_and_metrics_still_answers() -> None:
    with receiver("http/protobuf") as (endpoint, received):
        env = otlp_env(endpoint, "http/protobuf", OTEL_SDK_DISABLED="true", OTEL_TRACES_EXPORTER="otlp,console")
        with start_compter(env=env) as compter, httpx.Client(base_url=compter.url) as http:
            debt_id = str(http.post("/debts", json={"timeout": 60, "name": "deploy"}).json()["id"])
            assert http.post(f"/debts/{debt_id}", params={"payment": "build", "payoff": "true"}).status_code == 200
            samples = scrape(compter.url)
            time.sleep(1.5)
            assert compter.stop() == 0
            output = compter.output()
    labels = {("compter_debt_id", debt_id), ("compter_debt_name", "deploy"), ("compter_payment_name", "build")}
    assert samples["compter_payments_total", frozenset(labels)] == 1
    assert not received.metrics
    assert not received.logs
    assert not received.traces
    assert "trace_id" not in output, "no console exporter either"


def payment_latencies(*urls: str, payments: int) -> list[list[float]]:
    """Deploys of three stages under one id, each payment an event and a span, every third a payoff.

    With several URLs, each payment goes to each in turn, so that a busy machine slows them alike.
    """
    cycle = [
        ({"timeout": "1h", "name": "deploy", "payment": "build"}, 201),
        ({"payment": "test"}, 200),
        ({"payment": "release", "payoff": True}, 200),
    ]
    latencies: list[list[float]] = [[] for _ in urls]
    clients = [httpx.Client(base_url=url) for url in urls]
    try:
        for n in range(payments):
            body, status = cycle[n % 3]
            for http, measured in zip(clients, latencies, strict=True):
                started = time.perf_counter()
                answer = http.post("/debts/77", json=body)
                measured.append(time.perf_counter() - started)
                assert answer.status_code == status
    finally:
        for http in clients:
            http.close()
    return latencies


@pytest.mark.parametrize("collector", ["silent", "refusing"])
def test_a_collector_that_does_not_answer_never_slows_a_payment(collector: str) -> None:
    """Same status codes and latency as with no collector at all; SIGTERM still exits promptly."""
    with silent_endpoint() as silent:
        endpoint = silent if collector == "silent" else refusing_endpoint()
        env = otlp_env(
            endpoint, "http/protobuf", OTEL_METRIC_EXPORT_INTERVAL="1000", OTEL_EXPORTER_OTLP_TIMEOUT="30000"
        )
        with start_compter() as alone, start_compter(env=env) as compter:
            baseline, latencies = payment_latencies(alone.url, compter.url, payments=600)
            started = time.monotonic()
            assert compter.stop(timeout_s=30) == 0
            stopping_s = time.monotonic() - started
    assert statistics.median(latencies) < 1.5 * statistics.median(baseline) + 0.001
    assert max(latencies) < 1.0
    assert stopping_s < 10


def test_memory_stays_bounded_while_the_collector_is_silent() -> None:
    """Events and spans wait in bounded queues: once they are full, more payments do not grow the process."""
    with silent_endpoint() as endpoint:
        env = otlp_env(endpoint, "http/protobuf", OTEL_EXPORTER_OTLP_TIMEOUT="30000")
        with start_compter(env=env) as compter:
            payment_latencies(compter.url, payments=2400)
            full = rss_kib(compter.process.pid)
            payment_latencies(compter.url, payments=2400)
            later = rss_kib(compter.process.pid)
            output = compter.output()
    assert later - full < 10 * 1024
    assert 0 < output.count("Queue full") <= 6, "dropping is said, once a minute per queue"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")
