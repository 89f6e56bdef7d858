"""Named emitters over the OpenTelemetry API: what the service reports becomes metrics, events and spans.

The providers are built elsewhere (compter.otel at startup, tests with in-memory
readers and exporters); this module only decides what each transition means.
"""

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

from opentelemetry import metrics
from opentelemetry._logs import LoggerProvider, SeverityNumber
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.semconv._incubating.attributes import cicd_attributes as cicd
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace import (
    Status as SpanStatus,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AnyValue
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest

from compter import __version__
from compter.model import Debt, Event, EventKind, Status, TraceContext, rfc3339

log = logging.getLogger(__name__)

# The attribute the OpenTelemetry SDK gives the series that collects measurements past its cardinality limit.
OVERFLOW: Mapping[str, AnyValue] = MappingProxyType({"otel.metric.overflow": True})
_WARNING_EVENTS = frozenset({EventKind.OVERDUE, EventKind.TIMED_OUT})
_ENDING_EVENTS = frozenset({EventKind.DELETED, EventKind.PAID_OFF, EventKind.TIMED_OUT})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# SPEC names the W3C header: read it whatever OTEL_PROPAGATORS says.
_W3C = TraceContextTextMapPropagator()


# Room in each instrument for this many series per debt of the cap: a debt's bare payments and three
# named stages, say, or a few renames. Each costs the SDK about 1.5 KB.
SERIES_PER_DEBT = 4


def series_room(max_debts: int) -> int:
    """How many series each instrument may have."""
    return SERIES_PER_DEBT * max_debts


def metric_views(max_debts: int) -> list[View]:
    """Views that let the SDK hold every series Compter hands out (its own default limit is 2,000).

    Compter counts each instrument's series itself (Bounded), so that the SDK never folds a
    series into its overflow series without the log saying so; the + 1 is that overflow series.
    """
    return [View(instrument_name="compter.*", aggregation_cardinality_limit=series_room(max_debts) + 1)]


class Bounded:
    """A counter or histogram with room for its share of series; past it, the overflow series, and one warning."""

    def __init__(self, instrument: metrics.Counter | metrics.Histogram, name: str, max_debts: int) -> None:
        self._measure = instrument.add if isinstance(instrument, metrics.Counter) else instrument.record
        self._name = name
        self._max_debts = max_debts
        self._room = series_room(max_debts)
        self._used: set[frozenset[tuple[str, AnyValue]]] = set()
        self._warned = False

    def measure(self, value: float, attributes: Mapping[str, AnyValue]) -> None:
        self._measure(value, self._series(attributes))

    def _series(self, attributes: Mapping[str, AnyValue]) -> Mapping[str, AnyValue]:
        key = frozenset(attributes.items())
        if attributes is OVERFLOW or key in self._used:
            return attributes
        if len(self._used) < self._room:
            self._used.add(key)
            return attributes
        if not self._warned:
            self._warned = True
            log.warning(
                "%s has %d series, the most that COMPTER_METRICS_MAX_DEBTS=%d allows (%d a debt): new series are "
                'counted in the series labelled otel_metric_overflow="true", and the totals stay right',
                self._name,
                len(self._used),
                self._max_debts,
                SERIES_PER_DEBT,
            )
        return OVERFLOW


class StoredIds(IdGenerator):
    """Random ids, except while a debt's root span starts: then the ids stored with the debt.

    The tracer API cannot be given ids; the SDK's IdGenerator is its supported hook.
    """

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self._stored: ContextVar[TraceContext | None] = ContextVar("compter_stored_trace", default=None)

    @contextlib.contextmanager
    def stored(self, trace: TraceContext) -> Iterator[None]:
        token = self._stored.set(trace)
        try:
            yield
        finally:
            self._stored.reset(token)

    def generate_span_id(self) -> int:
        stored = self._stored.get()
        return int(stored.span_id, 16) if stored else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        stored = self._stored.get()
        return int(stored.trace_id, 16) if stored else self._random.generate_trace_id()

    def is_trace_id_random(self) -> bool:
        return True


class Telemetry:
    """Turns the events the service reports into OpenTelemetry signals.

    Per-debt gauges and `compter.debt.count` are read at collection (on the
    exporter's thread) from the debts given to `track`, kept current by `record`.
    """

    def __init__(
        self,
        *,
        meter_provider: MeterProvider,
        logger_provider: LoggerProvider,
        tracer_provider: TracerProvider,
        registry: CollectorRegistry,
        max_debts: int,
        shutdown: Callable[[], None] = lambda: None,
    ) -> None:
        if not isinstance(tracer_provider.id_generator, StoredIds):
            raise TypeError("the tracer provider must be built with id_generator=StoredIds()")
        self._ids = tracer_provider.id_generator
        self._sampler = tracer_provider.sampler
        self._tracer = tracer_provider.get_tracer("compter", __version__)
        self._logger = logger_provider.get_logger("compter", __version__)
        self._registry = registry
        self._max_debts = max_debts
        self._shutdown = shutdown
        self._lock = threading.Lock()
        self._tracked: dict[int, Debt] | None = None
        self._admitted: set[int] = set()
        self._warned = False
        meter = meter_provider.get_meter("compter", __version__)

        def bounded(
            create: Callable[[str, str, str], metrics.Counter | metrics.Histogram],
            name: str,
            unit: str,
            description: str,
        ) -> Bounded:
            return Bounded(create(name, unit, description), name, max_debts)

        self._payments = bounded(meter.create_counter, "compter.payments", "{payment}", "Payments received, per debt")
        self._payoffs = bounded(meter.create_counter, "compter.debt.payoffs", "{debt}", "Multi-stage debts paid off")
        self._timeouts = bounded(
            meter.create_counter, "compter.debt.timeouts", "{debt}", "Multi-stage debts that timed out"
        )
        self._duration = bounded(
            meter.create_histogram,
            "compter.debt.duration",
            "s",
            "How long multi-stage debts took, from creation to payoff or timeout",
        )
        self._stage_duration = bounded(
            meter.create_histogram,
            "compter.stage.duration",
            "s",
            "How long each named stage took, from the previous payment",
        )
        meter.create_observable_gauge(
            "compter.debt.overdue", [self._observe_overdue], "", "1 while a recurring debt is overdue, else 0"
        )
        meter.create_observable_gauge(
            "compter.debt.last_payment", [self._observe_last_payment], "s", "When the debt was last paid (Unix time)"
        )
        meter.create_observable_gauge(
            "compter.debt.deadline", [self._observe_deadline], "s", "When a recurring debt falls due (Unix time)"
        )
        meter.create_observable_gauge("compter.debt.count", [self._observe_count], "{debt}", "Debts, by status")

    def record(self, events: Sequence[Event]) -> None:
        for event in events:
            self._emit_event(event)
            if event.kind is EventKind.PAID:
                self._payment_received(event)
            elif event.kind is EventKind.PAID_OFF:
                self._debt_ended(event, Status.PAID_OFF)
            elif event.kind is EventKind.TIMED_OUT:
                self._debt_ended(event, Status.TIMED_OUT)
            elif event.kind is EventKind.DELETED and event.debt.trace is not None:
                self._end_trace(event.debt, event.debt.trace, event.at, None)
        self._follow(events)

    def new_trace(self, traceparent: str | None) -> TraceContext:
        carrier = {"traceparent": traceparent} if traceparent else {}
        caller = get_current_span(_W3C.extract(carrier)).get_span_context()
        span_id = f"{self._ids.generate_span_id():016x}"
        if not caller.is_valid:
            # Decided now, as the root span will be, so that the stage spans exported first agree with it.
            trace_id = self._ids.generate_trace_id()
            decision = self._sampler.should_sample(None, trace_id, "compter.debt").decision
            sampled = decision is Decision.RECORD_AND_SAMPLE
            return TraceContext(f"{trace_id:032x}", span_id, sampled=sampled)
        return TraceContext(f"{caller.trace_id:032x}", span_id, f"{caller.span_id:016x}", caller.trace_flags.sampled)

    def track(self, debts: Iterable[Debt] | None) -> None:
        tracked = None if debts is None else {debt.id: debt for debt in debts}
        if tracked is not None:
            self._admit(tracked)
        with self._lock:
            self._tracked = tracked

    def prometheus_text(self) -> tuple[bytes, str]:
        return generate_latest(self._registry), CONTENT_TYPE_PLAIN_0_0_4

    def shutdown(self) -> None:
        """Flush what is pending and stop the exporters."""
        self._shutdown()

    def _payment_received(self, event: Event) -> None:
        debt = event.debt
        attributes = self._per_debt(debt)
        if attributes is not OVERFLOW and event.payment is not None:
            attributes = {**attributes, "compter.payment.name": event.payment}
        self._payments.measure(1, attributes)
        if event.payment is None or event.since is None:
            return
        stage = _named({"compter.debt.name": debt.name, "compter.payment.name": event.payment})
        self._stage_duration.measure((event.at - event.since).total_seconds(), stage)
        if debt.trace is not None:
            span = self._tracer.start_span(
                event.payment,
                context=_root_context(debt.trace),
                start_time=_nanoseconds(event.since),
                attributes={
                    **_span_attributes(debt, event.at),
                    "compter.payment.name": event.payment,
                    cicd.CICD_PIPELINE_TASK_NAME: event.payment,
                    cicd.CICD_PIPELINE_TASK_RUN_ID: f"{debt.id}/{len(debt.paid)}",
                    cicd.CICD_PIPELINE_TASK_RUN_RESULT: cicd.CicdPipelineTaskRunResultValues.SUCCESS.value,
                },
            )
            span.end(_nanoseconds(event.at))

    def _debt_ended(self, event: Event, status: Status) -> None:
        debt = event.debt
        by_name = _named({"compter.debt.name": debt.name})
        (self._payoffs if status is Status.PAID_OFF else self._timeouts).measure(1, by_name)
        self._duration.measure((event.at - debt.created).total_seconds(), {**by_name, "compter.debt.status": status})
        if debt.trace is not None:
            self._end_trace(debt, debt.trace, event.at, status)

    def _end_trace(self, debt: Debt, trace: TraceContext, at: datetime, status: Status | None) -> None:
        """Export the root span, under the ids stored with the debt, parented like the request that created it.

        A status of None is a debt deleted while open: a cancelled run, not an error.
        """
        action = cicd.CicdPipelineActionNameValues.RUN.value
        attributes: dict[str, AnyValue] = {
            **_span_attributes(debt, at),
            cicd.CICD_PIPELINE_ACTION_NAME: action,
            cicd.CICD_PIPELINE_RUN_ID: str(debt.id),
        }
        if debt.name is not None:
            attributes[cicd.CICD_PIPELINE_NAME] = debt.name
        if status is Status.PAID_OFF:
            attributes[cicd.CICD_PIPELINE_RESULT] = cicd.CicdPipelineResultValues.SUCCESS.value
            span_status = SpanStatus(StatusCode.OK)
        elif status is None:
            attributes[cicd.CICD_PIPELINE_RESULT] = cicd.CicdPipelineResultValues.CANCELLATION.value
            span_status = SpanStatus(StatusCode.UNSET)
        else:
            attributes[cicd.CICD_PIPELINE_RESULT] = cicd.CicdPipelineResultValues.TIMEOUT.value
            attributes[ERROR_TYPE] = "timeout"
            missing = ", ".join(debt.missing_stages) or "none"
            span_status = SpanStatus(StatusCode.ERROR, f"timed out; missing stages: {missing}")
        parent = Context()
        if trace.parent_span_id is not None:
            parent = _span_context(trace.trace_id, trace.parent_span_id, trace.sampled, remote=True)
        with self._ids.stored(trace):
            span = self._tracer.start_span(
                f"{action} {debt.name}" if debt.name else action,
                context=parent,
                kind=SpanKind.SERVER,
                start_time=_nanoseconds(debt.created),
                attributes=attributes,
            )
        span.set_status(span_status)
        span.end(_nanoseconds(at))

    def _emit_event(self, event: Event) -> None:
        debt = event.debt
        attributes = _debt_attributes(debt, event.at)
        if event.payment is not None:
            attributes["compter.payment.name"] = event.payment
        warning = event.kind in _WARNING_EVENTS
        self._logger.emit(
            timestamp=_nanoseconds(event.at),
            context=_root_context(debt.trace) if debt.trace is not None else None,
            severity_number=SeverityNumber.WARN if warning else SeverityNumber.INFO,
            severity_text="WARN" if warning else "INFO",
            body=f"debt {debt.id}{f' ({debt.name})' if debt.name else ''}: {event.kind.value}",
            attributes=attributes,
            event_name=f"compter.debt.{event.kind.value}",
        )

    def _follow(self, events: Sequence[Event]) -> None:
        """Keep the tracked debts current between two `track` calls."""
        if self._tracked is None:
            return
        self._admit(event.debt.id for event in events)
        with self._lock:
            if self._tracked is None:
                return
            for event in events:
                if event.kind in _ENDING_EVENTS:
                    self._tracked.pop(event.debt.id, None)
                else:
                    self._tracked[event.debt.id] = event.debt

    def _per_debt(self, debt: Debt) -> Mapping[str, AnyValue]:
        """The per-debt attributes, or the overflow attribute for a debt past the cap."""
        self._admit([debt.id])
        return _labels(debt) if debt.id in self._admitted else OVERFLOW

    def _admit(self, debt_ids: Iterable[int]) -> None:
        """Give per-debt series to the first `max_debts` debts this process reports, and to no other.

        An admission is never taken back: the SDK keeps every attribute set it has
        seen until the process ends, so a freed place would not free its memory.
        """
        new = set(debt_ids) - self._admitted
        room = self._max_debts - len(self._admitted)
        with self._lock:
            self._admitted.update(sorted(new)[: max(room, 0)])
        if len(new) > room and not self._warned:
            self._warned = True
            log.warning(
                "more than COMPTER_METRICS_MAX_DEBTS=%d debts: per-debt metric series are kept for the first %d "
                "debts this process reported; payments of the others are counted in the series labelled "
                'otel_metric_overflow="true", and compter_debt_count still counts every debt',
                self._max_debts,
                self._max_debts,
            )

    def _snapshot(self) -> list[Debt] | None:
        """The tracked debts, copied under the lock; None when this process does not report them."""
        with self._lock:
            return None if self._tracked is None else list(self._tracked.values())

    def _observe_overdue(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(int(debt.announced_status is Status.OVERDUE), _labels(debt))
            for debt in self._admitted_debts()
            if debt.recurring
        ]

    def _observe_last_payment(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(debt.updated.timestamp(), _labels(debt)) for debt in self._admitted_debts() if debt.payments > 0
        ]

    def _observe_deadline(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(debt.deadline.timestamp(), _labels(debt))
            for debt in self._admitted_debts()
            if debt.recurring and debt.deadline is not None
        ]

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        debts = self._snapshot()
        if debts is None:
            return []
        counts = Counter(debt.announced_status for debt in debts)
        return [Observation(counts[status], {"compter.debt.status": status.value}) for status in Status]

    def _admitted_debts(self) -> list[Debt]:
        return [debt for debt in self._snapshot() or () if debt.id in self._admitted]


def _labels(debt: Debt) -> dict[str, AnyValue]:
    """The attributes that tell one debt's series from another's."""
    return _named({"compter.debt.id": str(debt.id), "compter.debt.name": debt.name})


def _debt_attributes(debt: Debt, now: datetime) -> dict[str, AnyValue]:
    """Every field of the debt as `compter.debt.*` attributes, as the API shows it; absent when null."""
    deadline = debt.deadline
    attributes: dict[str, AnyValue] = {
        "compter.debt.id": str(debt.id),
        "compter.debt.name": debt.name,
        "compter.debt.created": rfc3339(debt.created),
        "compter.debt.updated": rfc3339(debt.updated),
        "compter.debt.payments": debt.payments,
        "compter.debt.interval": debt.interval,
        "compter.debt.grace": debt.grace,
        "compter.debt.timeout": debt.timeout,
        "compter.debt.stages": list(debt.stages) if debt.stages is not None else None,
        "compter.debt.paid": [{"name": payment.name, "at": rfc3339(payment.at)} for payment in debt.paid],
        "compter.debt.deadline": rfc3339(deadline) if deadline is not None else None,
        "compter.debt.status": debt.status(now).value,
    }
    if debt.status(now) is Status.TIMED_OUT:
        attributes["compter.debt.missing_stages"] = list(debt.missing_stages)
    return _named(attributes)


def _span_attributes(debt: Debt, now: datetime) -> dict[str, AnyValue]:
    """The debt's attributes without `paid`: a span attribute cannot hold maps, and the stage spans show it."""
    attributes = _debt_attributes(debt, now)
    del attributes["compter.debt.paid"]
    return attributes


def _named(attributes: dict[str, AnyValue]) -> dict[str, AnyValue]:
    """Drop null attributes: OpenTelemetry has no null, an absent attribute says it."""
    return {key: value for key, value in attributes.items() if value is not None}


def _root_context(trace: TraceContext) -> Context:
    return _span_context(trace.trace_id, trace.span_id, trace.sampled, remote=False)


def _span_context(trace_id: str, span_id: str, sampled: bool, *, remote: bool) -> Context:
    """A context whose current span is the given one, as a parent for new spans and log records."""
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return set_span_in_context(NonRecordingSpan(SpanContext(int(trace_id, 16), int(span_id, 16), remote, flags)))


def _nanoseconds(moment: datetime) -> int:
    """Exact to the microsecond, which a float timestamp is not."""
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000
