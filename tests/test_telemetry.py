"""The emitters, through the real service and store, with in-memory readers and exporters (no globals)."""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from compter.model import PaymentRequest, rfc3339
from compter.service import Service
from compter.store.memory import MemoryStore
from compter.telemetry import OVERFLOW, StoredIds, Telemetry, metric_views
from tests.fakes import FakeClock


@dataclass
class Harness:
    """A Telemetry over in-memory providers, behind a real service on the memory store and a fake clock."""

    telemetry: Telemetry
    service: Service
    clock: FakeClock
    metrics: InMemoryMetricReader
    logs: InMemoryLogRecordExporter
    spans: InMemorySpanExporter

    def values(self, name: str) -> dict[frozenset[tuple[str, Any]], float]:
        """The current value of each series of metric `name` (histograms: their count), by attributes."""
        data = self.metrics.get_metrics_data()
        found: dict[frozenset[tuple[str, Any]], float] = {}
        for resource_metrics in data.resource_metrics if data else ():
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            value = getattr(point, "value", None)
                            found[frozenset((point.attributes or {}).items())] = (
                                value if value is not None else point.count  # type: ignore[union-attr]
                            )
        return found

    def by_debt(self, name: str) -> dict[str, float]:
        return {dict(key).get("compter.debt.id", "overflow"): value for key, value in self.values(name).items()}

    def events(self) -> list[tuple[str | None, dict[str, Any], int | None]]:
        return [
            (log.log_record.event_name, dict(log.log_record.attributes or {}), log.log_record.timestamp)
            for log in self.logs.get_finished_logs()
        ]

    def finished_spans(self) -> tuple[ReadableSpan, ...]:
        return self.spans.get_finished_spans()


def harness(max_debts: int = 100, sampler: Sampler | None = None) -> Harness:
    clock = FakeClock()
    metrics = InMemoryMetricReader()
    logs = InMemoryLogRecordExporter()
    spans = InMemorySpanExporter()
    registry = CollectorRegistry()
    logger_provider = LoggerProvider(shutdown_on_exit=False)
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    tracer_provider = TracerProvider(id_generator=StoredIds(), sampler=sampler, shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    meter_provider = MeterProvider(
        metric_readers=[metrics, PrometheusMetricReader(scope_info_enabled=False, registry=registry)],
        views=metric_views(max_debts),
        shutdown_on_exit=False,
    )
    telemetry = Telemetry(
        meter_provider=meter_provider,
        logger_provider=logger_provider,
        tracer_provider=tracer_provider,
        registry=registry,
        max_debts=max_debts,
    )
    return Harness(telemetry, Service(MemoryStore(), telemetry, clock), clock, metrics, logs, spans)


@pytest.fixture
def h() -> Harness:
    return harness()


def pay(**definition: object) -> PaymentRequest:
    return PaymentRequest(definition)


def stage(name: str, payoff: bool = False) -> PaymentRequest:
    return PaymentRequest({}, payment=name, payoff=payoff)


def nanoseconds(moment: datetime) -> int:
    return int(moment.timestamp()) * 10**9 + moment.microsecond * 1000


def unix(moment: datetime | None) -> float:
    assert moment is not None
    return moment.timestamp()


async def test_the_payment_counter_counts_every_payment_per_debt_vivifying_ones_included(h: Harness) -> None:
    first = await h.service.create({"name": "nightly", "interval": 3600.0})
    second = await h.service.create({"interval": 60.0})
    for _ in range(3):
        await h.service.pay(first.id, pay())
    await h.service.pay(second.id, pay())
    await h.service.pay(42, pay(interval=60.0))
    deploy = await h.service.create({"timeout": 600.0})
    await h.service.pay(deploy.id, stage("build"))

    assert h.values("compter.payments") == {
        frozenset({("compter.debt.id", str(first.id)), ("compter.debt.name", "nightly")}): 3,
        frozenset({("compter.debt.id", str(second.id))}): 1,
        frozenset({("compter.debt.id", "42")}): 1,
        frozenset({("compter.debt.id", str(deploy.id)), ("compter.payment.name", "build")}): 1,
    }


async def test_gauges_follow_a_missed_deadline_and_the_recovery(h: Harness) -> None:
    h.telemetry.track([])
    debt = await h.service.create({"name": "nightly", "interval": 60.0, "grace": 30.0})
    debt_id = str(debt.id)
    assert h.by_debt("compter.debt.overdue") == {debt_id: 0}
    assert h.by_debt("compter.debt.deadline") == {debt_id: unix(debt.deadline)}
    assert h.by_debt("compter.debt.last_payment") == {}, "never paid: no last_payment series"

    paid, _ = await h.service.pay(debt.id, pay())
    assert h.by_debt("compter.debt.last_payment") == {debt_id: unix(paid.updated)}
    assert h.by_debt("compter.debt.deadline") == {debt_id: unix(paid.deadline)}

    h.clock.advance(91)
    assert await h.service.sweep() == 1
    assert h.by_debt("compter.debt.overdue") == {debt_id: 1}
    assert h.values("compter.debt.count")[frozenset({("compter.debt.status", "overdue")})] == 1

    recovered, _ = await h.service.pay(debt.id, pay())
    assert h.by_debt("compter.debt.overdue") == {debt_id: 0}
    assert h.by_debt("compter.debt.last_payment") == {debt_id: unix(recovered.updated)}
    assert h.by_debt("compter.debt.deadline") == {debt_id: unix(recovered.deadline)}


async def test_overdue_is_what_the_watcher_announced_not_what_a_stale_copy_suggests(h: Harness) -> None:
    """In a fleet the holder's copy of a debt paid by another process is up to seconds old."""
    debt = await h.service.create({"interval": 60.0})
    h.telemetry.track([debt])  # a copy, as the holder read it
    h.clock.advance(61)  # past the copy's deadline: another process may have been paid since
    assert h.by_debt("compter.debt.overdue") == {str(debt.id): 0}
    assert h.values("compter.debt.count")[frozenset({("compter.debt.status", "ok")})] == 1
    assert await h.service.sweep() == 1  # the store says it is still due: now it is overdue
    assert h.by_debt("compter.debt.overdue") == {str(debt.id): 1}
    assert h.values("compter.debt.count")[frozenset({("compter.debt.status", "overdue")})] == 1


async def test_a_deleted_or_cleared_debt_loses_its_gauges_and_the_count_follows(h: Harness) -> None:
    h.telemetry.track([])
    kept = await h.service.create({"interval": 60.0})
    gone = await h.service.create({"interval": 60.0})
    deploy = await h.service.create({"timeout": 600.0})
    for debt in (kept, gone, deploy):
        await h.service.pay(debt.id, pay())
    assert set(h.by_debt("compter.debt.last_payment")) == {str(kept.id), str(gone.id), str(deploy.id)}
    assert set(h.by_debt("compter.debt.deadline")) == {str(kept.id), str(gone.id)}, "multi-stage: no deadline series"

    await h.service.delete(gone.id)
    await h.service.pay(deploy.id, PaymentRequest({}, payoff=True))

    assert set(h.by_debt("compter.debt.last_payment")) == {str(kept.id)}
    assert set(h.by_debt("compter.debt.overdue")) == {str(kept.id)}
    counts = {dict(key)["compter.debt.status"]: value for key, value in h.values("compter.debt.count").items()}
    assert counts == {"ok": 1, "overdue": 0, "open": 0, "paid_off": 0, "timed_out": 0}


async def test_only_a_tracking_process_reports_the_fleet_gauges(h: Harness) -> None:
    debt = await h.service.create({"interval": 60.0})
    await h.service.pay(debt.id, pay())
    assert h.values("compter.debt.overdue") == {}
    assert h.values("compter.debt.count") == {}

    h.telemetry.track(await h.service.all_debts())
    assert h.by_debt("compter.debt.overdue") == {str(debt.id): 0}

    h.telemetry.track(None)
    await h.service.create({"interval": 60.0})
    assert h.values("compter.debt.overdue") == {}
    assert h.values("compter.debt.count") == {}
    assert h.by_debt("compter.payments") == {str(debt.id): 1}, "the counter is this process's own"


async def test_every_event_is_one_log_record_with_its_name_time_and_the_whole_debt(h: Harness) -> None:
    debt = await h.service.create({"name": "nightly", "interval": 60.0})
    created_at = h.clock.now
    h.clock.advance(61)
    await h.service.sweep()
    h.clock.advance(1)
    await h.service.pay(debt.id, pay())
    await h.service.delete(debt.id)
    await h.service.pay(7, pay(interval=30.0))

    events = h.events()
    assert [name for name, _, _ in events] == [
        "compter.debt.created",
        "compter.debt.overdue",
        "compter.debt.paid",
        "compter.debt.recovered",
        "compter.debt.deleted",
        "compter.debt.vivified",
        "compter.debt.paid",
    ]
    _, created, timestamp = events[0]
    assert timestamp == nanoseconds(created_at)
    assert created == {
        "compter.debt.id": str(debt.id),
        "compter.debt.name": "nightly",
        "compter.debt.created": rfc3339(created_at),
        "compter.debt.updated": rfc3339(created_at),
        "compter.debt.payments": 0,
        "compter.debt.interval": 60.0,
        "compter.debt.grace": 0.0,
        "compter.debt.paid": (),
        "compter.debt.deadline": rfc3339(created_at + timedelta(seconds=60)),
        "compter.debt.status": "ok",
    }
    _, overdue, overdue_at = events[1]
    assert overdue["compter.debt.status"] == "overdue"
    assert overdue_at == nanoseconds(created_at + timedelta(seconds=61))
    assert events[3][1]["compter.debt.payments"] == 1
    assert events[3][1]["compter.debt.status"] == "ok"
    assert events[6][1]["compter.debt.id"] == "7"
    assert events[6][1]["compter.debt.payments"] == 1


async def test_multi_stage_events_carry_stages_payments_and_what_is_missing(h: Harness) -> None:
    deploy = await h.service.create({"name": "deploy", "timeout": 600.0, "stages": ("build", "test", "release")})
    h.clock.advance(10)
    await h.service.pay(deploy.id, stage("build"))
    h.clock.advance(600)
    await h.service.sweep()

    paid, timed_out = h.events()[1][1], h.events()[2][1]
    assert h.events()[2][0] == "compter.debt.timed_out"
    assert paid["compter.payment.name"] == "build"
    assert paid["compter.debt.paid"] == ({"name": "build", "at": rfc3339(deploy.created + timedelta(seconds=10))},)
    assert timed_out["compter.debt.stages"] == ("build", "test", "release")
    assert timed_out["compter.debt.missing_stages"] == ("test", "release")
    assert timed_out["compter.debt.status"] == "timed_out"
    assert timed_out["compter.debt.timeout"] == 600.0
    assert h.values("compter.debt.timeouts") == {frozenset({("compter.debt.name", "deploy")}): 1}
    assert h.values("compter.debt.duration") == {
        frozenset({("compter.debt.name", "deploy"), ("compter.debt.status", "timed_out")}): 1
    }


async def test_payoff_counts_and_durations(h: Harness) -> None:
    for _ in range(2):
        deploy = await h.service.create({"name": "deploy", "timeout": 600.0})
        h.clock.advance(5)
        await h.service.pay(deploy.id, stage("build"))
        h.clock.advance(7)
        await h.service.pay(deploy.id, stage("release", payoff=True))

    assert h.values("compter.debt.payoffs") == {frozenset({("compter.debt.name", "deploy")}): 2}
    histogram = h.metrics.get_metrics_data()
    assert histogram is not None
    durations = {
        metric.name: [(dict(point.attributes or {}), point.sum, point.count) for point in metric.data.data_points]
        for metric in histogram.resource_metrics[0].scope_metrics[0].metrics
        if metric.name in ("compter.debt.duration", "compter.stage.duration")
    }
    assert durations["compter.debt.duration"] == [
        ({"compter.debt.name": "deploy", "compter.debt.status": "paid_off"}, 24.0, 2)
    ]
    assert sorted(durations["compter.stage.duration"], key=str) == [
        ({"compter.debt.name": "deploy", "compter.payment.name": "build"}, 10.0, 2),
        ({"compter.debt.name": "deploy", "compter.payment.name": "release"}, 14.0, 2),
    ]


async def test_past_the_cap_per_debt_series_stop_once_with_a_warning_and_totals_stay_right(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = harness(max_debts=3)
    h.telemetry.track([])
    debts = [await h.service.create({"interval": 60.0}) for _ in range(5)]
    with caplog.at_level(logging.WARNING, logger="compter.telemetry"):
        for debt in debts:
            await h.service.pay(debt.id, pay())
            await h.service.pay(debt.id, pay())

    admitted = {str(debt.id) for debt in debts[:3]}
    assert set(h.by_debt("compter.debt.overdue")) == admitted
    assert set(h.by_debt("compter.debt.last_payment")) == admitted
    payments = h.by_debt("compter.payments")
    assert payments == {**dict.fromkeys(admitted, 2), "overflow": 4}
    assert sum(payments.values()) == 10
    assert h.values("compter.debt.count")[frozenset({("compter.debt.status", "ok")})] == 5
    warnings = [record for record in caplog.records if "COMPTER_METRICS_MAX_DEBTS" in record.getMessage()]
    assert len(warnings) == 1


async def test_debts_within_the_cap_keep_every_series_of_their_named_payments(caplog: pytest.LogCaptureFixture) -> None:
    h = harness(max_debts=4)
    h.telemetry.track([])
    with caplog.at_level(logging.WARNING, logger="compter.telemetry"):
        for debt_id in (101, 102, 103):
            await h.service.pay(debt_id, pay(name=f"deploy-{debt_id}", timeout=900.0, stages=("a", "b", "c")))
            for name in ("a", "b", "c"):
                await h.service.pay(debt_id, stage(name))
            await h.service.pay(debt_id, PaymentRequest({}, payoff=True))
        nightly = await h.service.create({"name": "nightly-backup", "interval": 86400.0})
        await h.service.pay(nightly.id, pay())
    payments = h.values("compter.payments")
    assert len(payments) == 3 * 4 + 1
    assert h.by_debt("compter.payments").keys() == {"101", "102", "103", str(nightly.id)}
    assert (
        payments[
            frozenset({("compter.debt.id", "103"), ("compter.debt.name", "deploy-103"), ("compter.payment.name", "c")})
        ]
        == 1
    )
    assert not caplog.records


async def test_past_its_share_of_series_an_instrument_overflows_with_a_warning_and_totals_stay_right(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = harness(max_debts=1)
    h.telemetry.track([])
    stages = ("s1", "s2", "s3", "s4", "s5")
    with caplog.at_level(logging.WARNING, logger="compter.telemetry"):
        await h.service.pay(7, pay(name="deploy", timeout=900.0))
        for name in stages:
            await h.service.pay(7, stage(name))
    payments = h.values("compter.payments")
    assert len(payments) == 4 + 1  # the bare payment and three stages, then the overflow series
    assert payments[frozenset(OVERFLOW.items())] == 2
    assert sum(payments.values()) == 6
    assert sum(h.values("compter.stage.duration").values()) == 5
    warned = [record.getMessage() for record in caplog.records]
    assert len([message for message in warned if message.startswith("compter.payments has 4 series")]) == 1
    assert len([message for message in warned if message.startswith("compter.stage.duration has 4 series")]) == 1


async def test_the_cap_goes_past_the_sdk_default_of_2000_series() -> None:
    h = harness(max_debts=2500)
    h.telemetry.track([])
    for debt_id in range(1, 2201):
        await h.service.pay(debt_id, pay(interval=60.0))
    assert len(h.by_debt("compter.payments")) == 2200
    assert "overflow" not in h.by_debt("compter.payments")
    assert len(h.by_debt("compter.debt.overdue")) == 2200


async def test_metrics_in_prometheus_text_with_spec_names_and_labels(h: Harness) -> None:
    h.telemetry.track([])
    nightly = await h.service.create({"name": "nightly", "interval": 60.0})
    paid, _ = await h.service.pay(nightly.id, pay())
    deploy = await h.service.create({"name": "deploy", "timeout": 60.0})
    await h.service.pay(deploy.id, stage("build", payoff=True))
    late = await h.service.create({"name": "late", "timeout": 60.0})
    h.clock.advance(61)
    await h.service.sweep()

    body, content_type = h.telemetry.prometheus_text()
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {
        (sample.name, frozenset((k, v) for k, v in sample.labels.items() if v)): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    nightly_labels = frozenset({("compter_debt_id", str(nightly.id)), ("compter_debt_name", "nightly")})
    assert samples["compter_payments_total", nightly_labels] == 1
    build = frozenset({("compter_debt_id", str(deploy.id)), ("compter_debt_name", "deploy")})
    assert samples["compter_payments_total", build | {("compter_payment_name", "build")}] == 1
    assert samples["compter_debt_overdue", nightly_labels] == 1
    assert samples["compter_debt_last_payment_seconds", nightly_labels] == unix(paid.updated)
    assert samples["compter_debt_deadline_seconds", nightly_labels] == unix(paid.deadline)
    assert samples["compter_debt_count", frozenset({("compter_debt_status", "overdue")})] == 1
    assert samples["compter_debt_payoffs_total", frozenset({("compter_debt_name", "deploy")})] == 1
    assert samples["compter_debt_timeouts_total", frozenset({("compter_debt_name", late.name or "")})] == 1
    duration = frozenset({("compter_debt_name", "deploy"), ("compter_debt_status", "paid_off")})
    assert samples["compter_debt_duration_seconds_count", duration] == 1
    stage_labels = frozenset({("compter_debt_name", "deploy"), ("compter_payment_name", "build")})
    assert samples["compter_stage_duration_seconds_count", stage_labels] == 1
    names = {name for name, _ in samples}
    assert not any("payment_payment" in name or "debt_debt" in name or "{" in name for name in names)


async def test_two_telemetries_in_one_process_keep_their_own_metrics() -> None:
    one, two = harness(), harness()
    await one.service.pay(1, pay(interval=60.0))
    assert b"compter_payments_total" in one.telemetry.prometheus_text()[0]
    assert b"compter_payments_total" not in two.telemetry.prometheus_text()[0]


def test_a_tracer_provider_without_stored_ids_is_refused() -> None:
    with pytest.raises(TypeError, match="StoredIds"):
        Telemetry(
            meter_provider=MeterProvider(shutdown_on_exit=False),
            logger_provider=LoggerProvider(shutdown_on_exit=False),
            tracer_provider=TracerProvider(shutdown_on_exit=False),
            registry=CollectorRegistry(),
            max_debts=10,
        )
