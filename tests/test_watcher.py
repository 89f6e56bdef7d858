"""The deadline watcher, on the real clock: it acts within a second and idles without work."""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest

from compter.errors import StoreUnavailable
from compter.model import EventKind, PaymentRequest
from compter.service import Service
from compter.store.memory import MemoryStore
from compter.watcher import Watcher
from tests.fakes import RecordingTelemetry


class CountingStore(MemoryStore):
    """Counts how often the watcher asks for the next due time."""

    def __init__(self) -> None:
        super().__init__()
        self.next_due_calls = 0

    async def next_due(self):  # type: ignore[no-untyped-def]
        self.next_due_calls += 1
        return await super().next_due()


@pytest.fixture
def real_time() -> tuple[Service, RecordingTelemetry, CountingStore]:
    telemetry = RecordingTelemetry()
    store = CountingStore()
    return Service(store, telemetry), telemetry, store


@contextlib.asynccontextmanager
async def watching(service: Service) -> AsyncIterator[None]:
    watcher = Watcher(service)
    watcher.start()
    try:
        yield
    finally:
        await watcher.stop()


async def wait_for_event(telemetry: RecordingTelemetry, kind: EventKind, timeout_s: float = 3) -> float:
    """Seconds until an event of that kind was recorded."""
    started = time.monotonic()
    while not any(event.kind is kind for event in telemetry.events):
        assert time.monotonic() - started < timeout_s, f"no {kind} event within {timeout_s} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_flips_a_missed_deadline_within_a_second_without_requests(
    real_time: tuple[Service, RecordingTelemetry, CountingStore],
) -> None:
    service, telemetry, _ = real_time
    async with watching(service):
        debt = await service.create({"interval": 0.3})
        await wait_for_event(telemetry, EventKind.OVERDUE)
        overdue = next(event for event in telemetry.events if event.kind is EventKind.OVERDUE)
        assert debt.deadline is not None
        lateness_s = (overdue.at - debt.deadline).total_seconds()
        assert 0 <= lateness_s < 1
        assert (await service.get(debt.id)).overdue


async def test_a_new_earlier_deadline_wakes_a_sleeping_watcher(
    real_time: tuple[Service, RecordingTelemetry, CountingStore],
) -> None:
    service, telemetry, _ = real_time
    await service.create({"interval": 3600})
    async with watching(service):
        await asyncio.sleep(0.05)  # let it go to sleep until the far deadline
        await service.create({"interval": 0.2})
        assert await wait_for_event(telemetry, EventKind.OVERDUE) < 1.2


async def test_a_payment_in_time_prevents_the_overdue(
    real_time: tuple[Service, RecordingTelemetry, CountingStore],
) -> None:
    service, telemetry, _ = real_time
    async with watching(service):
        debt = await service.create({"interval": 0.4})
        for _ in range(4):
            await asyncio.sleep(0.2)
            await service.pay(debt.id, PaymentRequest({}))
        assert EventKind.OVERDUE not in {event.kind for event in telemetry.events}
        await wait_for_event(telemetry, EventKind.OVERDUE)


async def test_idles_while_no_deadline_is_near(real_time: tuple[Service, RecordingTelemetry, CountingStore]) -> None:
    service, _, store = real_time
    await service.create({"interval": 3600})
    async with watching(service):
        await asyncio.sleep(0.5)
    assert store.next_due_calls == 1


class LeasedStore(MemoryStore):
    """A store shared with an imaginary fleet: the lease goes to whoever the test says."""

    shared = True

    def __init__(self) -> None:
        super().__init__()
        self.lease_holder: str | None = None

    async def hold_lease(self, holder: str, ttl_s: float) -> bool:
        if self.lease_holder is None:
            self.lease_holder = holder
        return self.lease_holder == holder

    async def release_lease(self, holder: str) -> None:
        if self.lease_holder == holder:
            self.lease_holder = None


async def wait_until(condition: Callable[[], bool], timeout_s: float = 3) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"not true within {timeout_s} s"
        await asyncio.sleep(0.01)


async def test_only_the_lease_holder_acts_and_reports_gauges() -> None:
    telemetry = RecordingTelemetry()
    store = LeasedStore()
    store.lease_holder = "another process"
    service = Service(store, telemetry)
    debt = await service.create({"interval": 0.1})
    watcher = Watcher(service, holder="this process", poll_s=0.05)
    watcher.start()
    try:
        await asyncio.sleep(0.4)
        assert not watcher.holding
        assert telemetry.tracked is None
        assert EventKind.OVERDUE not in telemetry.kinds()

        store.lease_holder = None  # the holder died and its lease expired
        await wait_for_event(telemetry, EventKind.OVERDUE, timeout_s=1)
        assert watcher.holding
        assert telemetry.tracked is not None
        assert [tracked.id for tracked in telemetry.tracked] == [debt.id]

        store.lease_holder = "another process"  # it lost the lease (a long pause, say)
        await wait_until(lambda: not watcher.holding)
        assert telemetry.tracked is None
    finally:
        await watcher.stop()


async def test_a_shared_store_is_polled_for_due_times_set_by_other_processes() -> None:
    telemetry = RecordingTelemetry()
    store = LeasedStore()
    service = Service(store, telemetry)
    other_process = Service(store, RecordingTelemetry())  # its due times do not wake this watcher
    async with watching(service):
        await asyncio.sleep(0.05)
        await other_process.create({"interval": 0.2})
        assert await wait_for_event(telemetry, EventKind.OVERDUE) < 1.0


async def test_the_holder_of_a_single_process_store_reports_every_debt_from_start_to_stop(
    real_time: tuple[Service, RecordingTelemetry, CountingStore],
) -> None:
    service, telemetry, _ = real_time
    created = [await service.create({"interval": 3600}) for _ in range(3)]
    async with watching(service):
        await wait_until(lambda: telemetry.tracked is not None)
        assert [debt.id for debt in telemetry.tracked or []] == [debt.id for debt in created]
    # Still reported once stopped, for the flush at exit to carry.
    assert [debt.id for debt in telemetry.tracked or []] == [debt.id for debt in created]


async def test_a_stopping_holder_gives_the_lease_back() -> None:
    store = LeasedStore()
    service = Service(store, RecordingTelemetry())
    async with watching(service):
        await wait_until(lambda: store.lease_holder is not None)
    assert store.lease_holder is None


class FailingStore(MemoryStore):
    """A store that does not answer until told to."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def hold_lease(self, holder: str, ttl_s: float) -> bool:
        if self.down:
            raise StoreUnavailable("connection refused")
        return True


async def test_a_store_outage_is_logged_once_then_its_end(caplog: pytest.LogCaptureFixture) -> None:
    store = FailingStore()
    caplog.set_level(logging.INFO, logger="compter.watcher")
    async with watching(Service(store, RecordingTelemetry())):
        await asyncio.sleep(2.5)  # three attempts, a second apart
        store.down = False
        await wait_until(lambda: "answers again" in caplog.text)
    outage = [record for record in caplog.records if "connection refused" in record.getMessage()]
    assert len(outage) == 1


class CancellationSwallowingStore(LeasedStore):
    """Loses the first cancellation that arrives while it renews the lease, as redis-py's writes on 3.11 can."""

    swallowed = False

    async def hold_lease(self, holder: str, ttl_s: float) -> bool:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed = True
        return await super().hold_lease(holder, ttl_s)


async def test_stops_even_when_the_store_swallows_the_cancellation() -> None:
    store = CancellationSwallowingStore()
    watcher = Watcher(Service(store, RecordingTelemetry()), poll_s=0.01)
    watcher.start()
    await wait_until(lambda: store.lease_holder is not None)
    await asyncio.sleep(0.02)  # into a lease renewal
    async with asyncio.timeout(1):
        await watcher.stop()
    assert store.swallowed
    assert store.lease_holder is None, "it gave the lease back on the way out"
