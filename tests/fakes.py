"""Test doubles: a fake clock and a telemetry that records what the service reports."""

import itertools
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from compter.model import Debt, Event, TraceContext

T0 = datetime(2026, 12, 3, 19, 0, 0, 123456, tzinfo=UTC)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


class RecordingTelemetry:
    """Keeps the events the service reports, for tests that check what happened."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.tracked: list[Debt] | None = None
        self._ids = itertools.count(1)

    def record(self, events: Sequence[Event]) -> None:
        self.events.extend(events)

    def new_trace(self, traceparent: str | None) -> TraceContext:
        n = next(self._ids)
        return TraceContext(f"{n:032x}", f"{n:016x}")

    def track(self, debts: Iterable[Debt] | None) -> None:
        self.tracked = None if debts is None else list(debts)

    def prometheus_text(self) -> tuple[bytes, str]:
        return b"# no metrics in this test\n", "text/plain; version=0.0.4; charset=utf-8"

    def kinds(self) -> list[str]:
        return [event.kind.value for event in self.events]
